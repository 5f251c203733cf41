"""Colab from a badge: one repository URL, badges and install cells generated from it, and the install cell run in a
simulated Colab (a fake google.colab module, a local repository) until course_lib imports from the clone."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from course_lib import colab, doctor
from course_lib.cli import main

ROOT = Path(__file__).resolve().parents[1]
FORK = "https://github.com/someone/my-diffusion-fork"


def test_urls_badges_and_links():
    assert colab.repo_slug("https://github.com/a-b/c.d") == "a-b/c.d"
    assert colab.repo_slug("https://github.com/a/b.git") == "a/b"
    for bad in ("github.com/a/b", "https://gitlab.com/a/b", "https://github.com/a"):
        with pytest.raises(ValueError, match="OWNER/NAME"):
            colab.repo_slug(bad)
    assert colab.clone_dir(FORK) == "/content/my-diffusion-fork"
    link = colab.badge_url("notebooks/03_samplers.ipynb", FORK)
    assert link == "https://colab.research.google.com/github/someone/my-diffusion-fork/blob/main/notebooks/03_samplers.ipynb"
    text = f"see [x]({colab.badge_url('notebooks/01_a.ipynb')}) and [y]({colab.badge_url('notebooks/02_b.ipynb')})"
    assert colab.retarget(text, url=FORK).count("someone/my-diffusion-fork/blob/main/notebooks/0") == 2
    assert colab.student_links(text, "01_a.ipynb", FORK).count("notebooks/student/01_a.ipynb") == 2
    cell = colab.install_cell(FORK)
    assert f"git clone -q --depth 1 {FORK} /content/my-diffusion-fork" in cell and "--no-deps" in cell


def test_missing_requirements_names_only_what_is_absent_or_out_of_range(monkeypatch):
    monkeypatch.setattr(doctor, "REQUIRED", {"numpy": ">=1.0", "jupyterlab": ">=3.6"})
    assert doctor.missing_requirements() == ""  # both installed here
    monkeypatch.setattr(doctor, "REQUIRED", {"numpy": ">=999", "no-such-dist-xyz": "", "jupyterlab": ">=999"})
    assert doctor.missing_requirements(skip=["JupyterLab"]) == "'numpy>=999' no-such-dist-xyz"  # quoted for a shell


def _course_copy(dest: Path) -> Path:
    """The parts of the repository that `colab.sync` and an install need, copied from the working tree."""
    shutil.copytree(ROOT / "course_lib", dest / "course_lib", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "notebooks").mkdir()
    for p in sorted((ROOT / "notebooks").glob("0[01]_*.ipynb")):
        shutil.copy(p, dest / "notebooks" / p.name)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def test_a_fork_repoints_every_badge_install_cell_and_the_homepage(tmp_path, capsys):
    root = _course_copy(tmp_path / "fork")
    assert main(["colab", "--root", str(root), "--check"]) == 0
    assert main(["colab", "--root", str(root), "--url", FORK]) == 0
    assert "release" in capsys.readouterr().out  # it says what to do next
    slug = colab.repo_slug(FORK)
    for p in (root / "notebooks").glob("*.ipynb"):
        nb = json.loads(p.read_text())
        first = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
        assert first == colab.install_cell(FORK)
        assert "diffusion-course/diffusion-course" not in p.read_text() and f"{slug}/blob/main/notebooks/{p.name}" in p.read_text()
    readme = (root / "README.md").read_text()
    assert "diffusion-course/diffusion-course" not in readme and colab.install_cell(FORK) in readme
    assert f'Homepage = "{FORK}"' in (root / "pyproject.toml").read_text()
    assert f'REPO_URL = "{FORK}"' in (root / "course_lib" / "colab.py").read_text()  # the one place, too
    assert colab.sync(root, FORK, write=False) == []  # idempotent
    assert main(["colab", "--root", str(root), "--check"]) == 1  # against this checkout's REPO_URL: out of step
    assert main(["colab", "--root", str(root), "--url", "https://example.com/x"]) == 2
    assert main(["colab", "--root", str(tmp_path)]) == 2  # not the course repository


def test_student_copies_badges_open_the_student_copy(tmp_path):
    from course_lib.grading.release import release

    release(ROOT / "notebooks", tmp_path)
    for p in sorted(tmp_path.glob("*.ipynb")):
        assert colab.badge_url(f"notebooks/student/{p.name}") in p.read_text()
        assert colab.badge_url(f"notebooks/{p.name}") not in p.read_text()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed: the install cell clones with git")
def outer_venv(venv: Path) -> Path:
    """A virtual environment that sees this test's own packages (torch, pip, setuptools: nothing is downloaded) and
    not the base interpreter's: a path file lists this environment's site folders, after the venv's own. (A venv with
    --system-site-packages would see the base Python's packages, which differ from machine to machine.)"""
    import site
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    inner = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           check=True, capture_output=True, text=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()])
    (Path(inner) / "_outer_environment.pth").write_text("\n".join(p for p in ours if Path(p).is_dir()) + "\n")
    return venv


def test_the_install_cell_works_in_a_simulated_colab(tmp_path):
    """The first cell's Colab branch, run by IPython with a fake google.colab, in a virtual environment (so the
    regular install lands there, not over this checkout's), cloning a local repository of the working tree: then
    course_lib imports from the clone, grading included, without a restart, and the cell moved into notebooks/."""
    pytest.importorskip("IPython")
    src = _course_copy(tmp_path / "repo")
    git = ["git", "-C", str(src), "-c", "user.email=t@t", "-c", "user.name=t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "course"]):
        subprocess.run(git + args, check=True, capture_output=True)
    venv = outer_venv(tmp_path / "venv")
    python = venv / "bin" / "python"
    clone = tmp_path / "content" / "course"
    cell = colab.install_cell(f"file://{src}", str(clone))
    script = textwrap.dedent(f"""
        import os, sys, types, importlib
        sys.modules["google.colab"] = types.ModuleType("google.colab")  # what the cell looks for
        from IPython.core.interactiveshell import InteractiveShell
        result = InteractiveShell.instance().run_cell({cell!r})
        assert result.success, result.error_in_exec or result.error_before_exec
        importlib.invalidate_caches()
        import course_lib, course_lib.grading.calls
        from course_lib import check
        print("FILE", course_lib.__file__)
        print("CWD", os.getcwd())
    """)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "PIP_NO_INDEX": "1",
           "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "GIT_CONFIG_NOSYSTEM": "1"}
    r = subprocess.run([str(python), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("FILE ", "CWD ")))
    assert Path(out["FILE"]).resolve().is_relative_to(venv.resolve()), r.stdout  # the clone's install, not this checkout
    assert Path(out["CWD"]).resolve() == (clone / "notebooks").resolve()
    assert (clone / "course_lib" / "colab.py").is_file()
