"""Colab from a badge: one repository URL, badges and install cells generated from it, and the install cell run in a
simulated Colab (a fake google.colab module, a local repository) until course_lib imports from the clone."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from course_lib import colab
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
    assert f'"--depth", "1", "{FORK}", COURSE' in cell and 'COURSE = "/content/my-diffusion-fork"' in cell
    import ast  # until the course is installed the cell imports the standard library only (and no magics)
    imported = {a.name for n in ast.walk(ast.parse(cell)) if isinstance(n, ast.Import) for a in n.names}
    assert imported == {"os", "subprocess", "sys"} and not any(isinstance(n, ast.ImportFrom) for n in ast.walk(ast.parse(cell)))


def test_the_colab_setup_script_names_only_what_is_absent_or_out_of_range():
    from course_lib import colab_setup

    todo = colab_setup.missing(["numpy>=1.0", "jupyterlab>=999", "numpy>=999", "no-such-dist-xyz"])
    assert [(req, name) for req, name, _ in todo] == [("numpy>=999", "numpy"), ("no-such-dist-xyz", "no-such-dist-xyz")]
    assert todo[0][2] and todo[1][2] is None  # the installed version, or None
    assert "torch>=2.2" in colab_setup.requirements(ROOT)


def _course_copy(dest: Path) -> Path:
    """The parts of the repository that `colab.sync` and an install need, copied from the working tree."""
    shutil.copytree(ROOT / "course_lib", dest / "course_lib", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "notebooks").mkdir()
    for p in sorted((ROOT / "notebooks").glob("0[01]_*.ipynb")):
        shutil.copy(p, dest / "notebooks" / p.name)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def test_a_fork_repoints_every_badge_install_cell_and_the_homepage(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(colab, "url_answers", lambda url: (True, "answers"))  # no network in tests: see below
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


def test_the_check_says_when_the_repository_does_not_answer(tmp_path, capsys):
    """`colab --check` asks the repository itself (git ls-remote): tried here on local repositories, no network."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "-C", str(repo), "init", "-q"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    assert colab.url_answers(f"file://{repo}") == (True, "answers")
    ok, why = colab.url_answers(f"file://{tmp_path / 'nowhere'}")
    assert not ok and why
    root = _course_copy(tmp_path / "course")  # in step with the course's URL, but that URL does not answer here
    import course_lib.colab as module
    saved = module.url_answers
    module.url_answers = lambda url: (False, "no answer in 30 s")
    try:
        assert main(["colab", "--root", str(root), "--check"]) == 1
    finally:
        module.url_answers = saved
    out = capsys.readouterr().out
    assert "does not answer as a git repository (no answer in 30 s)" in out and "cannot be reached" in out


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


class SimulatedColab:
    """A Colab-like runtime: a virtual environment seeing this test's packages, a fake google.colab module, IPython
    running the lesson's first cell, and a local git repository of the course as the URL (nothing is downloaded)."""

    def __init__(self, tmp_path: Path, extra_requirement: str | None = None):
        self.tmp = tmp_path
        self.src = _course_copy(tmp_path / "repo")
        if extra_requirement:  # a dependency the runtime lacks, served from a local wheel folder
            text = (self.src / "pyproject.toml").read_text()
            (self.src / "pyproject.toml").write_text(text.replace('dependencies = [\n',
                                                                  f'dependencies = [\n    "{extra_requirement}",\n', 1))
        git = ["git", "-C", str(self.src), "-c", "user.email=t@t", "-c", "user.name=t"]
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "course"]):
            subprocess.run(git + args, check=True, capture_output=True)
        self.venv = outer_venv(tmp_path / "venv")
        self.clone = tmp_path / "content" / "course"
        self.cell = colab.install_cell(f"file://{self.src}", str(self.clone))
        self.wheels = tmp_path / "wheels"
        self.wheels.mkdir()
        self.blocker = tmp_path / "blocker"

    def run(self, before: str = "", after: str = "", hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """Run the cell once in a fresh kernel (code `before` and `after` it); `hide` makes modules unimportable."""
        script = textwrap.dedent("""
            import os, sys, types, importlib
            sys.modules["google.colab"] = types.ModuleType("google.colab")  # what the cell looks for
            from IPython.core.interactiveshell import InteractiveShell
            {before}
            result = InteractiveShell.instance().run_cell({cell!r})
            print("SUCCESS", result.success)
            if not result.success:
                print("ERROR", result.error_in_exec or result.error_before_exec)
            importlib.invalidate_caches()
            {after}
        """).format(before=before, after=after, cell=self.cell)
        env = {"PATH": f"{self.venv / 'bin'}:/usr/bin:/bin", "HOME": str(self.tmp), "PIP_NO_INDEX": "1",
               "PIP_FIND_LINKS": str(self.wheels), "PIP_NO_BUILD_ISOLATION": "0",
               "PIP_DISABLE_PIP_VERSION_CHECK": "1", "GIT_CONFIG_NOSYSTEM": "1"}
        if hide:
            self.blocker.mkdir(exist_ok=True)
            (self.blocker / "sitecustomize.py").write_text(textwrap.dedent(f"""
                import sys
                class _Hide:
                    def find_spec(self, name, path=None, target=None):
                        if name.split(".")[0] in {hide!r}:
                            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                sys.meta_path.insert(0, _Hide())
            """))
            env["PYTHONPATH"] = str(self.blocker)
        return subprocess.run([str(self.venv / "bin" / "python"), "-c", script], cwd=self.tmp, env=env,
                              capture_output=True, text=True, timeout=600)


def probe_wheel(folder: Path, version: str, tmp: Path) -> None:
    """Build a tiny package `course-colab-probe` at `version` into the wheel folder (offline)."""
    pkg = tmp / f"probe-{version}"
    (pkg / "course_colab_probe").mkdir(parents=True)
    (pkg / "course_colab_probe" / "__init__.py").write_text(f"VERSION = {version!r}\n")
    (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "course-colab-probe"
        version = "{version}"
        [tool.setuptools]
        packages = ["course_colab_probe"]
    """))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(folder), str(pkg)], check=True, capture_output=True)


def test_the_install_cell_works_in_a_simulated_colab(tmp_path):
    """Installed from the clone, course_lib imports at once (no restart); the cell says so in one line, moves into
    notebooks/, and run again has nothing left to do."""
    pytest.importorskip("IPython")
    colab_ = SimulatedColab(tmp_path)
    r = colab_.run(after="import course_lib, course_lib.grading.calls\nfrom course_lib import check\n"
                         "print('FILE', course_lib.__file__)\nprint('CWD', os.getcwd())")
    assert r.returncode == 0 and "SUCCESS True" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("FILE ", "CWD ")))
    assert Path(out["FILE"]).resolve().is_relative_to(colab_.venv.resolve()), r.stdout  # the clone's, not this checkout
    assert Path(out["CWD"]).resolve() == (colab_.clone / "notebooks").resolve()
    said = [line for line in r.stdout.splitlines() if not line.startswith(("SUCCESS", "FILE", "CWD"))]
    assert said == ["Course ready: installed the course; no restart needed."], said  # quiet: no pip warnings
    r = colab_.run()
    assert "Course ready: nothing to install." in r.stdout and "SUCCESS True" in r.stdout, r.stdout + r.stderr


def test_the_install_cell_needs_nothing_but_the_standard_library_until_it_has_installed(tmp_path):
    """A runtime where numpy cannot be imported (the old cell imported course_lib, hence numpy, first): the cell runs."""
    pytest.importorskip("IPython")
    colab_ = SimulatedColab(tmp_path)
    r = colab_.run(after="print('NUMPY', 'numpy' in sys.modules)", hide=("numpy",))
    assert "SUCCESS True" in r.stdout and "NUMPY False" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Course ready" in r.stdout


def test_the_install_cell_resumes_after_a_cut_short_clone_and_a_failed_install(tmp_path):
    pytest.importorskip("IPython")
    colab_ = SimulatedColab(tmp_path, extra_requirement="course-colab-probe>=1")
    # a dependency that cannot be fetched yet: the cell stops with a message saying what to do, and no traceback wall
    r = colab_.run()
    assert "SUCCESS False" in r.stdout and "course-colab-probe" in r.stdout and "Run this cell again" in r.stdout
    # the clone was cut short (its files half there): the next run clones again; the package can now be fetched
    (colab_.clone / "course_lib" / "colab_setup.py").unlink()
    probe_wheel(colab_.wheels, "1.0", tmp_path)
    r = colab_.run(after="import course_colab_probe; print('PROBE', course_colab_probe.VERSION)")
    assert "SUCCESS True" in r.stdout and "PROBE 1.0" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "installed course-colab-probe; no restart needed" in r.stdout


def test_the_install_cell_asks_for_a_restart_only_when_it_replaced_an_imported_package(tmp_path):
    pytest.importorskip("IPython")
    colab_ = SimulatedColab(tmp_path, extra_requirement="course-colab-probe>=2")
    probe_wheel(colab_.wheels, "1.0", tmp_path)
    subprocess.run([str(colab_.venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", "--find-links",
                    str(colab_.wheels), "course-colab-probe==1.0"], check=True, capture_output=True)
    probe_wheel(colab_.wheels, "2.0", tmp_path)
    r = colab_.run(before="import course_colab_probe")  # this kernel holds version 1 in memory
    assert "SUCCESS False" in r.stdout and "restart it (Runtime > Restart session)" in r.stdout, r.stdout + r.stderr
    assert "course-colab-probe (replacing 1.0)" in r.stdout
    r = colab_.run(after="import course_colab_probe; print('PROBE', course_colab_probe.VERSION)")  # after the restart
    assert "Course ready: nothing to install." in r.stdout and "PROBE 2.0" in r.stdout, r.stdout + r.stderr
