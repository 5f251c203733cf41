"""Honest code in any ordinary style gets full marks with no flag: the corpus of tests/honest_submissions.py (decorators,
classes, helper cells, names that shadow the library's, numpy, einsum, torch.func, allowed library calls), graded by
the batch grader on secret inputs and tasks like any class."""
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

from course_lib.exercises import EXERCISES
from course_lib.grading import Limits, grade_batch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from honest_submissions import SUBMISSIONS  # noqa: E402

LIMITS = Limits(timeout=300, cell_timeout=30, call_timeout=20, grace=10, memory_mb=3072)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("honest")
    subs = tmp / "subs"
    subs.mkdir()
    for name, cells in SUBMISSIONS.items():
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# My work")]
                                      + [nbformat.v4.new_code_cell(c) for c in cells])
        nbformat.write(nb, str(subs / name))
    records, totals = grade_batch([subs], tmp / "g.csv", tmp / "g.json", limits=LIMITS, jobs=2, echo=lambda s: None,
                                  scratch_base=tmp)
    return {Path(r["submission"]).name: r for r in records}, totals


def test_the_corpus_covers_every_lesson_with_exercises_in_at_least_twenty_submissions():
    lessons = {int(name[:2]) for name in SUBMISSIONS}
    assert len(SUBMISSIONS) >= 20 and lessons >= set(range(1, 11))


@pytest.mark.parametrize("name", sorted(SUBMISSIONS))
def test_an_honest_submission_gets_full_marks_with_no_flag(name, graded):
    records, _ = graded
    rec = records[name]
    expected = sorted(n for n, ex in EXERCISES.items() if ex.lesson == int(name[:2]))
    assert sorted(r["exercise"] for r in rec["rows"]) == expected
    for row in rec["rows"]:
        assert row["status"] == "passed" and row["points"] == row["max_points"] and not row["flag"], row
    assert not rec.get("findings"), rec.get("findings")
    assert not rec["refused"] and not rec["notes"], (rec["refused"], rec["notes"])


def test_the_batch_has_no_false_positive(graded):
    _, totals = graded
    assert totals["flagged"] == 0 and totals["points"] == totals["max_points"]
    assert os.name != "posix" or totals["submissions"] == len(SUBMISSIONS)
    assert json.dumps(totals)  # plain data
