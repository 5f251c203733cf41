"""Exercises graded safely: the batch grader (batch), its confined worker (worker, sandbox, channel), what it reads of
a submission without running it (scan, identity), and the student copies it grades (release).

The names below load course_lib.grading.batch on first use: the worker, which runs inside this package, must never
import the exercise references that batch imports.
"""
_BATCH = {"COLUMNS", "STATUSES", "WHOLE_NOTEBOOK", "Limits", "Submission", "clean", "definitions", "find_submissions",
          "grade_batch", "grade_notebook", "journal_path", "lesson_of", "main_grade", "read_cells", "summarize",
          "_csv_text", "_row"}
__all__ = sorted(n for n in _BATCH if not n.startswith("_"))


def __getattr__(name: str):
    if name in _BATCH:
        from . import batch

        return getattr(batch, name)
    raise AttributeError(f"module 'course_lib.grading' has no attribute {name!r}")
