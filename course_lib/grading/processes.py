"""The grader's child processes: each registered while it runs, all killed on Ctrl-C, and every process they leave
behind (a submission's escaped child) killed and reaped, because the grader is their subreaper (Linux)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

ACTIVE: set = set()  # worker processes running now (killed on Ctrl-C)
ACTIVE_LOCK = threading.Lock()


def kill_all() -> None:
    with ACTIVE_LOCK:
        for proc in list(ACTIVE):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _children() -> set[int]:
    """This process's child processes (Linux /proc)."""
    me, out = os.getpid(), set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                if int(fields[1]) == me:
                    out.add(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


class Reaper:
    """Makes this process the subreaper of everything its workers start (Linux), and kills what outlives them."""

    def __init__(self):
        self.linux = sys.platform.startswith("linux")
        self.before = _children() if self.linux else set()
        self.was = False
        if self.linux:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                value = ctypes.c_int(0)
                libc.prctl(37, ctypes.byref(value), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
                self.was = bool(value.value)
                libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
            except (OSError, AttributeError):
                self.linux = False

    def sweep(self) -> int:
        """Kill and reap every child that is neither a running worker nor was here before the batch."""
        if not self.linux:
            return 0
        with ACTIVE_LOCK:  # no worker is started or finished while the strays are told apart and killed
            strays = _children() - {p.pid for p in ACTIVE} - self.before
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for pid in strays:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # not ours to reap after all (a worker's own wait reaped it)
                pass
        return len(strays)

    def close(self) -> None:
        self.sweep()
        if self.linux and not self.was:
            try:
                ctypes.CDLL(None).prctl(36, 0, 0, 0, 0)
            except (OSError, AttributeError):
                pass
