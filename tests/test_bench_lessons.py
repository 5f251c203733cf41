"""`bench lessons` times each lesson without writing it, and prints the README's column."""
from pathlib import Path

import pytest

from course_lib.bench import lessons as L

ROOT = Path(__file__).resolve().parents[1]


def test_lessons_are_timed_in_quick_mode_and_never_written(capsys, tmp_path):
    before = (ROOT / "notebooks" / "00_welcome.ipynb").read_bytes()
    assert L.main_lessons(quick=True, json_path=tmp_path / "t.json", force=False, only=[0], root=ROOT) == 0
    out = capsys.readouterr().out
    assert "00_welcome.ipynb" in out and "quick mode" in out and "| 0 |" in out
    assert (ROOT / "notebooks" / "00_welcome.ipynb").read_bytes() == before
    import json

    rec = json.loads((tmp_path / "t.json").read_text())["records"][0]
    assert rec["error"] is None and rec["seconds"] > 0 and rec["mode"] == "quick"
    with pytest.raises(ValueError, match=r"no lesson numbered \[42\]"):
        L.lesson_files(ROOT, [42])


@pytest.mark.parametrize("seconds, text", [(7.2, "7 s"), (59, "59 s"), (75, "1.5 min"), (936, "15.5 min")])
def test_times_read_like_the_readme(seconds, text):
    assert L.human(seconds) == text
