"""A time limit on `check`: a learner's function still running after the limit (an endless loop) is interrupted with
SIGALRM, so the notebook gets a verdict and a hint instead of hanging."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager


class TimeUp(KeyboardInterrupt):
    """Raised by check's alarm in the learner's function (a KeyboardInterrupt, so no `except Exception` swallows it)."""


@contextmanager
def time_limit(seconds: float | None):
    """Interrupt the code inside after `seconds` (SIGALRM, main thread, POSIX); an earlier alarm already set (the
    grader's) is left alone and re-armed afterwards."""
    import signal
    import threading

    if (seconds is None or not hasattr(signal, "setitimer") or os.environ.get("COURSE_GRADING")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    remaining, interval = signal.getitimer(signal.ITIMER_REAL)
    if remaining and remaining <= seconds:
        yield
        return

    def alarm(signum, frame):
        raise TimeUp()

    previous, start = signal.signal(signal.SIGALRM, alarm), time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if remaining:
            signal.setitimer(signal.ITIMER_REAL, max(remaining - (time.monotonic() - start), 1e-3), interval)
