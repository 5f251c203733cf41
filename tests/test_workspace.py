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
    mine.write_text("my answers")  # a learner's saved work
    (dest / released[1].name).unlink()  # and a lesson they deleted
    assert main(["start", str(dest), "--repo", str(ROOT)]) == 0
    assert mine.read_text() == "my answers"
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
