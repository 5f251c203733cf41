"""A learner's work folder: the student lessons copied once, never overwritten, ignored by git and by the tests."""
import subprocess
from pathlib import Path

import pytest
import tomllib

from course_lib import workspace
from course_lib.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_start_copies_the_student_lessons_and_never_overwrites(tmp_path, capsys):
    dest = tmp_path / "my-work"
    copied, kept = workspace.start(dest, ROOT)
    released = sorted((ROOT / "notebooks" / "student").glob("*.ipynb"))
    assert [p.name for p in copied] == [p.name for p in released] and kept == []
    assert all((dest / p.name).read_bytes() == p.read_bytes() for p in released)
    mine = dest / released[0].name
    answers = mine.read_text().replace('"source": [', '"source": ["# my answers\\n", ', 1)
    mine.write_text(answers)  # a learner's saved work
    (dest / released[1].name).unlink()  # and a lesson they deleted
    assert main(["start", str(dest), "--repo", str(ROOT)]) == 0
    assert mine.read_text() == answers and "# my answers" in answers
    assert (dest / released[1].name).read_bytes() == released[1].read_bytes()  # restored
    out = capsys.readouterr().out
    assert "never overwritten" in out and f"jupyter lab {dest}" in out


def test_start_refuses_the_released_folders_and_a_file(tmp_path):
    for bad in (ROOT / "notebooks" / "student", ROOT / "notebooks"):
        with pytest.raises(ValueError, match="released lessons"):
            workspace.start(bad, ROOT)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        workspace.start(tmp_path / "f", ROOT)
    assert main(["start", str(tmp_path / "f"), "--repo", str(ROOT)]) == 2
    with pytest.raises(FileNotFoundError, match="student lessons"):
        workspace.start(tmp_path / "w", tmp_path)  # an explicit --repo without lessons: no silent fallback


def test_the_work_folder_is_ignored_by_git_and_outside_the_tests():
    paths = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    assert all(not (ROOT / p / "").resolve().is_relative_to((ROOT / workspace.DEFAULT_DIR).resolve()) for p in paths)
    assert workspace.DEFAULT_DIR not in paths
    r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", f"{workspace.DEFAULT_DIR}/03_samplers.ipynb"])
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert r.returncode == 0, f"{workspace.DEFAULT_DIR}/ is not ignored by git"


def _release(tmp_path, lessons: dict) -> Path:
    """A fake course checkout whose notebooks/student holds the given lessons (name -> text)."""
    repo = tmp_path / "course"
    (repo / "notebooks" / "student").mkdir(parents=True, exist_ok=True)
    for name, text in lessons.items():
        (repo / "notebooks" / "student" / name).write_text(text)
    return repo


def test_start_after_a_course_update_says_which_lessons_are_newer_and_never_loses_an_edit(tmp_path, capsys):
    repo = _release(tmp_path, {"01_a.ipynb": "a v1", "02_b.ipynb": "b v1", "03_c.ipynb": "c v1"})
    dest = tmp_path / "work"
    assert main(["start", str(dest), "--repo", str(repo)]) == 0
    capsys.readouterr()
    (dest / "02_b.ipynb").write_text("b v1 + my answers")   # the learner edits lesson 2, never opens 1 and 3
    _release(tmp_path, {"01_a.ipynb": "a v2", "02_b.ipynb": "b v2", "03_c.ipynb": "c v1", "04_d.ipynb": "d v1"})
    assert main(["start", str(dest), "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "copied    " in out and "04_d.ipynb" in out                                  # a new lesson arrives
    assert "01_a.ipynb has a newer release and you have not edited it" in out and "--refresh-untouched" in out
    assert (dest / "01_a.ipynb").read_text() == "a v1"                                 # not replaced unasked
    assert (dest / "02_b.ipynb").read_text() == "b v1 + my answers"                    # an edit is never lost
    assert (dest / "02_b.new.ipynb").read_text() == "b v2" and "02_b.new.ipynb" in out  # the new release beside it
    assert "03_c.ipynb" in out and "newer" not in [line for line in out.splitlines() if "03_c" in line][0]
    # asked to, start replaces what the learner never edited, and only that
    assert main(["start", str(dest), "--repo", str(repo), "--refresh-untouched"]) == 0
    out = capsys.readouterr().out
    assert (dest / "01_a.ipynb").read_text() == "a v2" and "refreshed 01_a" in out.replace(str(dest) + "/", "")
    assert (dest / "02_b.ipynb").read_text() == "b v1 + my answers"
    # a learner who edited the side-by-side copy keeps it: the next newer release gets another name
    (dest / "02_b.new.ipynb").write_text("b v2 + notes")
    _release(tmp_path, {"02_b.ipynb": "b v3"})
    workspace.update(dest, repo)
    assert (dest / "02_b.new.ipynb").read_text() == "b v2 + notes" and (dest / "02_b.new-2.ipynb").read_text() == "b v3"


def test_start_on_a_folder_without_a_record_tells_edits_from_updates_honestly(tmp_path, capsys):
    repo = _release(tmp_path, {"01_a.ipynb": "a v2", "02_b.ipynb": "b v1"})
    dest = tmp_path / "work"
    dest.mkdir()
    (dest / "01_a.ipynb").write_text("a v1 + answers")  # copied by an older `start`, which kept no record
    (dest / "02_b.ipynb").write_text("b v1")
    report = workspace.update(dest, repo)
    assert report.unknown == [dest / "01_a.ipynb"] and report.kept == [dest / "02_b.ipynb"]
    assert (dest / "01_a.ipynb").read_text() == "a v1 + answers" and not (dest / "01_a.new.ipynb").exists()
    (dest / workspace.MANIFEST).write_text("not json")  # a damaged record is rebuilt, nothing else touched
    assert main(["start", str(dest), "--repo", str(repo)]) == 0
    assert "cannot tell your edits from a course update" in capsys.readouterr().out
    assert (dest / "01_a.ipynb").read_text() == "a v1 + answers"
