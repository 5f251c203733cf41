"""course_lib: the tested library behind the hands-on diffusion course. One module per idea the lessons teach."""
from __future__ import annotations

from .runtime import budget, get_device, is_quick, seed_everything

__version__ = "0.1.0"
__all__ = ["check", "progress", "budget", "get_device", "is_quick", "seed_everything"]


def check(name: str, fn) -> bool:
    """Check your function for exercise `name`: prints passed / failed with a hint / not attempted; returns a bool."""
    from .exercises import check as _check  # imported on first use: the grader's sandbox never loads the answers

    return _check(name, fn)


def progress(lesson: int | None = None) -> tuple[int, int]:
    """Print the status of every exercise (of one lesson if given) checked this session; return (points, max)."""
    from .exercises import progress as _progress

    return _progress(lesson)
