"""Exercises graded safely: the batch grader (batch) and its side of each worker (session), the confined worker that
only runs code (worker, sandbox, channel), the tasks and oracles of behaviour exercises (tasks, oracles, harnesses),
what it reads of a submission without running it (reader, scan, names, libgraph), clusters (shards), and the
student copies it grades (release).

The names below load course_lib.grading.batch on first use: the worker, which runs inside this package, must never
import the exercise references that batch imports.
"""
_BATCH = {"COLUMNS", "FLAGS", "STATUSES", "WHOLE_NOTEBOOK", "Limits", "Submission", "clean", "definitions",
          "find_submissions", "grade_batch", "grade_notebook", "journal_path", "lesson_of", "main_grade", "read_cells",
          "read_submission", "summarize", "csv_text", "make_row"}
__all__ = sorted(n for n in _BATCH if not n.startswith("_"))


def __getattr__(name: str):
    if name in _BATCH:
        from . import batch

        return getattr(batch, name)
    raise AttributeError(f"module 'course_lib.grading' has no attribute {name!r}")
