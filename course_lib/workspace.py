"""A learner's own work folder: `python -m course_lib start [DIR]` copies the student lessons there, never over a file.

The repository's notebooks/ (solved lessons) and notebooks/student/ (blank exercises) stay as released, so nothing a
learner saves can make the tests fail, and no command of the course overwrites a learner's answers."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
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


MANIFEST = ".course-release.json"  # in the work folder: the release each lesson was copied from (sha256 of its bytes)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@dataclass
class StartReport:
    """What `start` did to a work folder, lesson by lesson."""

    copied: list[Path] = field(default_factory=list)      # new to the folder
    kept: list[Path] = field(default_factory=list)        # already there, the release unchanged since (or unknown)
    refreshed: list[Path] = field(default_factory=list)   # never edited, replaced by the newer release (on request)
    untouched_newer: list[Path] = field(default_factory=list)  # never edited, a newer release exists (not replaced)
    edited_newer: list[tuple[Path, Path]] = field(default_factory=list)  # (your copy, the newer release beside it)
    unknown: list[Path] = field(default_factory=list)     # differs from the release, copied before the folder kept a record
    repaired: list[tuple[Path, Path | None]] = field(default_factory=list)  # not a notebook: (lesson, kept where)


def _is_notebook(path: Path) -> bool:
    """Whether a file is a readable notebook (JSON with cells); a broken copy is not a learner's work."""
    try:
        nb = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(nb, dict) and isinstance(nb.get("cells"), list)


def _set_aside(path: Path) -> Path | None:
    """Move a broken lesson out of the way (an empty one is removed): NAME.ipynb.broken (not a notebook the grader
    or JupyterLab would pick up), never over a file."""
    if path.stat().st_size == 0:
        path.unlink()
        return None
    for k in range(1, 100):
        aside = path.with_name(f"{path.name}.broken{'' if k == 1 else f'-{k}'}")
        try:
            os.link(path, aside)
        except FileExistsError:
            continue
        except OSError:  # no hard links on this filesystem
            if aside.exists():
                continue
            os.rename(path, aside)
            return aside
        path.unlink()
        return aside
    raise ValueError(f"{path} is not a readable notebook and too many .broken copies exist beside it")


def _beside(target: Path, data: bytes) -> Path:
    """Write a newer release next to a learner's edited copy, as NAME.new.ipynb (or .new-2, ... when a different file
    has that name); never over a file. An identical copy already there is reused."""
    from .outputs import names_beside

    for candidate in names_beside(target):
        try:
            with open(candidate, "xb") as out:
                out.write(data)
            return candidate
        except FileExistsError:
            if candidate.read_bytes() == data:
                return candidate
    raise ValueError(f"too many newer copies of {target.name} in {target.parent}: remove the old .new ones")


def update(dest: str | Path = DEFAULT_DIR, repo: str | Path | None = None, refresh_untouched: bool = False) -> StartReport:
    """Copy every student lesson into `dest` (created if needed), never over a file, and say which lessons have a
    newer release than the one copied (recorded in dest/.course-release.json by content hash).

    A newer release of a lesson you never edited replaces it only with refresh_untouched=True; for a lesson you edited
    it is written beside yours as NAME.new.ipynb."""
    src = student_lessons(repo)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} exists and is not a folder")
    if dest.resolve() in (src.resolve(), src.parent.resolve()):
        raise ValueError(f"{dest} holds the released lessons; choose a folder of your own (default {DEFAULT_DIR}/)")
    dest.mkdir(parents=True, exist_ok=True)
    from .checkpoints import write_bytes_atomic, write_json_atomic

    manifest_path = dest / MANIFEST
    try:
        record = json.loads(manifest_path.read_text()).get("lessons", {}) if manifest_path.exists() else {}
    except (ValueError, AttributeError):
        record = {}  # an unreadable record is rebuilt; the lessons themselves are never touched for it
    report = StartReport()
    for lesson in sorted(src.glob("*.ipynb")):
        release = lesson.read_bytes()
        new_hash, target = _sha(release), dest / lesson.name
        if target.is_file() and _is_notebook(lesson) and not _is_notebook(target):  # e.g. 0 bytes: not your work
            kept = _set_aside(target)
            report.repaired.append((target, kept))
        try:
            write_bytes_atomic(release, target, replace=False)  # whole or not at all, and never over a file
            report.copied.append(target)
            record[lesson.name] = new_hash
            continue
        except FileExistsError:
            pass
        mine = _sha(target.read_bytes())
        copied_from = record.get(lesson.name)
        if mine == new_hash:
            record[lesson.name] = new_hash
            report.kept.append(target)
        elif copied_from is None:
            report.unknown.append(target)
        elif copied_from == new_hash:
            report.kept.append(target)  # your edits; the release has not changed
        elif mine == copied_from:  # never edited, and a newer release exists
            if refresh_untouched:
                write_bytes_atomic(release, target)
                record[lesson.name] = new_hash
                report.refreshed.append(target)
            else:
                report.untouched_newer.append(target)
        else:
            report.edited_newer.append((target, _beside(target, release)))
    write_json_atomic({"lessons": record, "note": "the release each lesson was copied from (sha256); written by "
                                                  "`python -m course_lib start`"}, manifest_path)
    return report


def start(dest: str | Path = DEFAULT_DIR, repo: str | Path | None = None) -> tuple[list[Path], list[Path]]:
    """Copy every student lesson into `dest` (created if needed); a lesson already there is kept as it is.

    Returns (copied, kept): run it again after a course update to get new lessons without touching old ones (see
    `update` for what changed)."""
    report = update(dest, repo)
    kept = report.kept + report.unknown + report.untouched_newer + [mine for mine, _ in report.edited_newer]
    return report.copied, sorted(kept)


def main_start(dest: str, repo: str | None = None, refresh_untouched: bool = False) -> int:
    """The `start` command: copy, then say what happened, which lessons have a newer release, and what to open."""
    r = update(dest, repo, refresh_untouched)
    for p in r.copied:
        print(f"copied    {p}")
    for p in r.kept:
        print(f"kept      {p} (already there: your work is never overwritten)")
    for p in r.refreshed:
        print(f"refreshed {p} (you had not edited it: replaced by its newer release)")
    for p in r.untouched_newer:
        print(f"newer     {p} has a newer release and you have not edited it: `python -m course_lib start {dest} "
              "--refresh-untouched` replaces it")
    for mine, new in r.edited_newer:
        print(f"newer     {mine} has a newer release; yours has your edits and is kept: the new release is {new.name}")
    for lesson, aside in r.repaired:
        print(f"repaired  {lesson} was not a readable notebook (an interrupted copy?): copied afresh"
              + (f"; the broken file is {aside.name}" if aside else " (it was empty)"))
    if r.unknown:
        print(f"{len(r.unknown)} lesson(s) differ from the current release and were copied before this folder kept a "
              f"record of releases, so `start` cannot tell your edits from a course update: "
              + ", ".join(p.name for p in r.unknown) + f". Compare with the released copies in {student_lessons(repo)}.")
    print(f"Your lessons are in {Path(dest)}/: open them with  jupyter lab {dest}")
    return 0
