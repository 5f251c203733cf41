"""What `progress()` shows: one lesson's exercises with status and points as checked in this kernel (or one line per
lesson), and where a learner's standing in the whole course is kept: the grader, run on the work folder."""
from __future__ import annotations

from .ideas import CAPSTONE

STANDING = ("These are the checks run in this kernel since it started; a restarted kernel or another notebook starts "
            "afresh.\nYour standing in every lesson: `python -m course_lib grade my-work --out grades.csv` in a "
            "terminal\n(it runs each notebook of your work folder again in quick mode, as an instructor's grader would).")


def show(lesson: int | str | None = None):
    """Print the exercises of one lesson with their status and points, as checked in this kernel, and where the whole
    course's standing is kept. Without a lesson: the lesson of the latest check (every lesson, one line each, before
    any check); `progress("all")`: every lesson. Returns (points, total) of what it showed."""
    from .. import exercises as E  # read at call time: results live in the package, per kernel

    lessons = sorted({ex.lesson for ex in E.EXERCISES.values()})
    if lesson is None:
        lesson = E._LAST_LESSON[-1] if E._LAST_LESSON else "all"
    if lesson != "all" and (isinstance(lesson, bool) or not isinstance(lesson, int) or lesson not in lessons):
        raise ValueError(f"no exercises in lesson {lesson!r}; lessons with exercises: {lessons} "
                         "(or 'all' for one line per lesson)")
    rows = []  # (lesson, name, status, earned, points): each lesson's exercises in the order they appear
    for n in sorted(E.EXERCISES, key=lambda n: E.EXERCISES[n].lesson):
        ex, res = E.EXERCISES[n], E._RESULTS.get(n)
        if lesson == "all" or ex.lesson == lesson:
            status = res.status if res else E.NOT_ATTEMPTED
            rows.append((ex.lesson, n, status, ex.points if status == E.PASSED else 0, ex.points))
    got, total = sum(r[3] for r in rows), sum(r[4] for r in rows)
    unit = lambda k: "point" if k == 1 else "points"  # noqa: E731
    if lesson == "all":
        print("Every lesson, as checked in this kernel:")
        for k in lessons:
            mine = [r for r in rows if r[0] == k]
            pts, tot = sum(r[3] for r in mine), sum(r[4] for r in mine)
            tried = any(r[2] != E.NOT_ATTEMPTED for r in mine)
            status = E.PASSED if pts == tot else (E.FAILED if tried else E.NOT_ATTEMPTED)
            word = {E.PASSED: "all passed", E.FAILED: "not all passed", E.NOT_ATTEMPTED: "not attempted"}[status]
            label = "capstone " if k == CAPSTONE else f"lesson {k:>2}"
            print(f"  {label}  {pts:>2} / {tot} {unit(tot):<6}  {word} {E._SYMBOL[status]}")
        print(f"Total: {got} / {total} points")
    else:
        print(f"{'The capstone' if lesson == CAPSTONE else f'Lesson {lesson}'}, as checked in this kernel:")
        width = max(len(r[1]) for r in rows)
        for _, n, status, earned, points in rows:
            print(f"  {n:<{width}}  {earned} / {points} {unit(points):<6}  {E._word(status)} {E._SYMBOL[status]}")
        print(f"Total for {'the capstone' if lesson == CAPSTONE else f'lesson {lesson}'}: {got} / {total} {unit(total)}")
    print(STANDING)
    return E.Score(got, total)
