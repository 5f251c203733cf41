"""The batch grader on the real lessons: every source lesson scores full marks and every student copy zero, each cell
running without an error or a refusal of the sandbox (the release round trip, graded). The longest test file: conftest.py
starts it first, so that the other files run beside it."""
import csv
import json
import sys
from pathlib import Path

import pytest

from course_lib.exercises import EXERCISES
from course_lib.grading import grade_batch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


# ---- the real lessons, graded in one batch ----------------------------------------------------------------


LESSONS = sorted(NOTEBOOKS.glob("*.ipynb"))


@pytest.fixture(scope="module")
def graded_lessons(tmp_path_factory):
    """Every lesson and its student copy graded in one batch (2 jobs: the two cores stay busy across lessons)."""
    tmp = tmp_path_factory.mktemp("lessons")
    out = tmp / "grades.csv"
    records, totals = grade_batch([NOTEBOOKS], out, tmp / "grades.json", jobs=2, echo=lambda s: None, scratch_base=tmp)
    return records, totals, tmp


def test_the_lesson_batch_writes_its_totals_and_cleans_up(graded_lessons):
    records, totals, tmp = graded_lessons
    assert len(records) == 2 * len(LESSONS)
    assert totals["points"] == totals["max_points"] / 2 and totals["status"]["error"] == 0
    saved = json.loads((tmp / "grades.json").read_text())
    with open(tmp / "grades.csv", newline="") as f:
        assert saved["totals"] == totals and len(list(csv.DictReader(f))) == totals["status"]["passed"] * 2
    assert not list(tmp.glob("course-grade-*")), "scratch folders left behind"


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_source_lessons_score_full_marks_and_student_copies_zero(lesson, graded_lessons):
    """One lesson and its student copy, from the batch: the release round trip, graded (a failure names its lesson)."""
    records = [r for r in graded_lessons[0] if Path(r["submission"]).name == lesson.name]
    assert sorted("/student/" in r["submission"].replace("\\", "/") for r in records) == [False, True], records
    for rec in records:
        expected = sorted(n for n, ex in EXERCISES.items() if ex.lesson == rec["lesson"])
        assert sorted(r["exercise"] for r in rec["rows"]) == expected and expected, rec["submission"]
        is_student = "/student/" in rec["submission"].replace("\\", "/")
        want = "not_attempted" if is_student else "passed"
        assert all(r["status"] == want and not r["flag"] for r in rec["rows"]), rec["rows"]
        assert not rec["notes"], (rec["submission"], rec["notes"])  # every cell ran without an error
        assert not rec["refused"], (rec["submission"], rec["refused"])  # and did nothing the sandbox refused
        assert rec["sandbox"][-1] == "audit hook"
        if sys.platform.startswith("linux"):
            assert rec["sandbox"][0].startswith("landlock") and "seccomp" in rec["sandbox"], rec["sandbox"]


def test_every_lesson_has_exercises_and_a_student_copy():
    """The per-lesson grading test above covers every lesson: each has exercises and a student copy, and no stray
    student copy lacks its source."""
    assert len(LESSONS) >= 11
    student = sorted(p.name for p in (NOTEBOOKS / "student").glob("*.ipynb"))
    assert student == [p.name for p in LESSONS]
    for lesson in LESSONS:
        assert any(ex.lesson == int(lesson.name[:2]) for ex in EXERCISES.values()), lesson.name
