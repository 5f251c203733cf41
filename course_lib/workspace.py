"""A learner's own work folder: `python -m course_lib start [DIR]` copies the student lessons there, never over a file.

The repository's notebooks/ (solved lessons) and notebooks/student/ (blank exercises) stay as released, so nothing a
learner saves can make the tests fail, and no command of the course overwrites a learner's answers."""
from __future__ import annotations

import shutil
from pathlib import Path

DEFAULT_DIR = "my-work"  # ignored by git (.gitignore) and outside the tests' paths (pyproject.toml)


def student_lessons(repo: str | Path | None = None) -> Path:
    """The folder of released student lessons: REPO/notebooks/student, the course checkout's, or ./notebooks/student."""
    candidates = [Path(repo)] if repo else [Path(__file__).resolve().parents[1], Path.cwd()]
    for root in candidates:
        folder = root / "notebooks" / "student"
        if any(folder.glob("*.ipynb")):
            return folder
    raise FileNotFoundError(f"cannot find the student lessons (notebooks/student/*.ipynb) in "
                            f"{' or '.join(str(c) for c in candidates)}: run this in the course repository, or pass "
                            "--repo with its path")


def start(dest: str | Path = DEFAULT_DIR, repo: str | Path | None = None) -> tuple[list[Path], list[Path]]:
    """Copy every student lesson into `dest` (created if needed); a lesson already there is kept as it is.

    Returns (copied, kept): run it again after a course update to get new lessons without touching old ones."""
    src = student_lessons(repo)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} exists and is not a folder")
    if dest.resolve() in (src.resolve(), src.parent.resolve()):
        raise ValueError(f"{dest} holds the released lessons; choose a folder of your own (default {DEFAULT_DIR}/)")
    dest.mkdir(parents=True, exist_ok=True)
    copied, kept = [], []
    for lesson in sorted(src.glob("*.ipynb")):
        target = dest / lesson.name
        try:
            with open(target, "xb") as out, open(lesson, "rb") as inp:  # "x": fails if the file exists, no race
                shutil.copyfileobj(inp, out)
            copied.append(target)
        except FileExistsError:
            kept.append(target)
    return copied, kept


def main_start(dest: str, repo: str | None = None) -> int:
    """The `start` command: copy, then say what happened and what to open."""
    copied, kept = start(dest, repo)
    for p in copied:
        print(f"copied {p}")
    for p in kept:
        print(f"kept   {p} (already there: your work is never overwritten)")
    print(f"Your lessons are in {Path(dest)}/: open them with  jupyter lab {dest}")
    return 0
