"""Where the course is hosted and how a lesson opens on Colab: one repository URL, from which the badges, the
install cell and pyproject.toml's homepage are generated (`python -m course_lib colab`), and checked by the tests.

A fork sets REPO_URL below to its own GitHub repository and runs `python -m course_lib colab`, then `release`.
This module imports nothing heavy: the command line and the tests read it without torch."""
from __future__ import annotations

import json
import re
from pathlib import Path

REPO_URL = "https://github.com/diffusion-course/diffusion-course"  # the one place that says where the course lives
BRANCH = "main"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
_LINK = re.compile(r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/[\w.-]+/(notebooks/[\w./-]+?\.ipynb)")


def repo_slug(url: str = REPO_URL) -> str:
    """'owner/name' of a GitHub repository URL."""
    m = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?", url)
    if not m:
        raise ValueError(f"REPO_URL must look like https://github.com/OWNER/NAME, got {url!r}")
    return f"{m.group(1)}/{m.group(2)}"


def clone_dir(url: str = REPO_URL) -> str:
    """Where the install cell clones the course on Colab."""
    return f"/content/{repo_slug(url).split('/')[1]}"


def badge_url(notebook: str, url: str = REPO_URL) -> str:
    """The Colab link that opens `notebook` (a path in the repository, e.g. notebooks/student/03_samplers.ipynb)."""
    return f"https://colab.research.google.com/github/{repo_slug(url)}/blob/{BRANCH}/{notebook}"


def badge(notebook: str, url: str = REPO_URL) -> str:
    """The 'Open in Colab' badge as markdown."""
    return f"[![Open in Colab]({BADGE_IMAGE})]({badge_url(notebook, url)})"


def install_cell(url: str = REPO_URL, where: str | None = None) -> str:
    """The first code cell of every lesson: on Colab, clone the course and install what Colab lacks; else nothing.

    It imports nothing but the standard library until the course is installed: course_lib/colab_setup.py (a script,
    stdlib only) installs the course without its dependencies (Colab's torch, Jupyter and widgets are kept), then only
    the declared requirements that are missing or out of range, quietly. Run again, it finishes an interrupted clone or
    install and otherwise does nothing; it asks for a restart only when a package the kernel had imported was
    replaced. `where` (default /content/NAME) is for tests."""
    where = where or clone_dir(url)
    return f"""\
# On Colab: fetch the course and install what Colab lacks (about a minute). Elsewhere this does nothing.
# After any error, run this cell again: it resumes.
import os, subprocess, sys
if "google.colab" in sys.modules:
    COURSE = "{where}"
    if not os.path.isfile(COURSE + "/course_lib/colab_setup.py"):  # not cloned yet, or the clone was cut short
        if os.path.isdir(COURSE + "/.git"):
            subprocess.run(["rm", "-rf", COURSE], check=True)
        got = subprocess.run(["git", "clone", "-q", "--depth", "1", "{url}", COURSE], capture_output=True, text=True)
        if got.returncode:
            raise RuntimeError("Cloning the course failed: " + got.stderr.strip() + "\\nRun this cell again.")
    loaded = ",".join(sorted({{m.split(".")[0] for m in sys.modules}}))
    setup = subprocess.run([sys.executable, COURSE + "/course_lib/colab_setup.py", COURSE], text=True,
                           capture_output=True, env={{**os.environ, "COURSE_LOADED": loaded}})
    print((setup.stdout + setup.stderr).strip())
    if setup.returncode:
        raise RuntimeError("The course is not ready yet: see the message above.")
    os.chdir(COURSE + "/notebooks")"""


def url_answers(url: str, timeout: float = 30) -> tuple[bool, str]:
    """Whether `git ls-remote` reaches the repository at `url` (what the install cell clones), and why not."""
    import subprocess

    try:
        r = subprocess.run(["git", "ls-remote", "--exit-code", url, "HEAD"], capture_output=True, text=True,
                           timeout=timeout, env={**__import__("os").environ, "GIT_TERMINAL_PROMPT": "0"})
    except FileNotFoundError:
        return False, "git is not installed"
    except subprocess.TimeoutExpired:
        return False, f"no answer in {timeout:g} s"
    if r.returncode:
        return False, (r.stderr.strip().splitlines() or [f"git exited with {r.returncode}"])[-1]
    return True, "answers"


def retarget(text: str, notebook: str | None = None, url: str = REPO_URL) -> str:
    """Every Colab link in `text` pointed at `url`; with `notebook`, every link opens that notebook (its own badge)."""
    return _LINK.sub(lambda m: badge_url(notebook or m.group(1), url), text)


def sync(root: str | Path, url: str = REPO_URL, write: bool = True) -> list[str]:
    """Make README.md, the lessons in notebooks/, pyproject.toml and REPO_URL agree with `url`; return the files that
    differed.

    Lessons: the first code cell is the install cell and every Colab link opens the lesson itself. README: every
    Colab link points at `url`, each still opening its notebook, and the install cell it quotes. pyproject.toml: the homepage. With
    write=False nothing is written (a check). Student copies follow with `release`."""
    root = Path(root)
    changed = []

    def update(path: Path, new: str):
        if path.read_text() != new:
            changed.append(str(path.relative_to(root)))
            if write:
                path.write_text(new)

    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text())
        first = next((c for c in nb["cells"] if c["cell_type"] == "code"), None)
        if first is None:
            raise ValueError(f"{path} has no code cell for the install cell")
        first["source"] = install_cell(url).splitlines(keepends=True)
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                cell["source"] = retarget("".join(cell["source"]), f"notebooks/{path.name}", url).splitlines(keepends=True)
        update(path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    readme = root / "README.md"
    text = re.sub(r"(?ms)^```python\n# On Colab: fetch the course.*?^```", lambda m: f"```python\n{install_cell(url)}\n```",
                  readme.read_text())
    update(readme, retarget(text, url=url))
    pyproject = root / "pyproject.toml"
    update(pyproject, re.sub(r'(?m)^Homepage = ".*"$', f'Homepage = "{url}"', pyproject.read_text()))
    here = root / "course_lib" / "colab.py"  # a new URL becomes the one place's value too
    if here.is_file():
        update(here, re.sub(r'(?m)^REPO_URL = "[^"]*"', f'REPO_URL = "{url}"', here.read_text(), count=1))
    return changed


def student_links(text: str, name: str, url: str = REPO_URL) -> str:
    """A student copy's markdown: its Colab links open the student copy of lesson `name`, not the solved lesson."""
    return retarget(text, f"notebooks/student/{Path(name).name}", url)
