"""The process that runs one untrusted submission for the grader (`course_lib.grading`).

It confines itself (course_lib.sandbox), runs the notebook's code cells in an IPython shell with a time limit
per cell, then calls the learner's functions on the inputs the grader sends only after the notebook has run,
and sends the raw outputs back. It never decides a grade: the grader compares the outputs with its own
reference in its own process. Messages both ways are length-prefixed `torch.save` payloads; the grader reads
them with `weights_only=True`, so a forged message can carry tensors and plain data, never code.
"""
from __future__ import annotations

import io
import os
import signal
import struct
import sys

import torch

MAX_MESSAGE = 64 << 20


def encode(obj) -> bytes:
    """One framed message: 8-byte little-endian length, then torch.save bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return struct.pack("<Q", buf.tell()) + buf.getvalue()


def decode(payload: bytes, trusted: bool = False):
    """A message body; only plain data and tensors unless `trusted` (the grader's own messages)."""
    return torch.load(io.BytesIO(payload), weights_only=not trusted)


def _read_message(f):
    header = f.read(8)
    if len(header) < 8:
        raise EOFError("the grader closed the channel")
    (size,) = struct.unpack("<Q", header)
    return decode(f.read(size), trusted=True)


class GradingTimeout(BaseException):
    """Raised by the alarm when a cell or a call runs past its limit (BaseException: `except Exception` misses it)."""


def _alarm(signum, frame):
    raise GradingTimeout()


class _Limit:
    """Raise GradingTimeout in the main thread after `seconds` (0: no limit)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)


def _prepare():
    """Import everything a lesson uses before confinement (later, loading C libraries is refused)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (builds the font cache now, while writing it is allowed)
    import numpy  # noqa: F401
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    import course_lib  # noqa: F401
    from course_lib import (analytic, bench, checkpoints, classifier, compare, data, doctor, exercises,  # noqa: F401
                            forward, gan, losses, metrics, models, plotting, runtime, samplers, schedules,
                            train, vae)
    try:
        import ipywidgets  # noqa: F401
        import matplotlib_inline.backend_inline  # noqa: F401
    except ImportError:
        pass
    class Shell(InteractiveShell):
        def enable_gui(self, gui=None):  # `%matplotlib inline` asks for no GUI event loop: nothing to do
            pass

    config = Config()
    config.HistoryManager.enabled = False
    return Shell.instance(config=config)


def _reference_codes(names) -> dict:
    """For each exercise, the code objects of course_lib functions that compute its answer."""
    import importlib

    from course_lib import exercises

    refs = {ex.reference.__code__ for ex in exercises.EXERCISES.values()}
    out = {}
    for name in names:
        codes = {}
        for dotted in exercises.LIBRARY_EQUIVALENTS.get(name, ()):
            module, attr = dotted.rsplit(".", 1)
            codes[getattr(importlib.import_module(module), attr).__code__] = dotted
        codes.update({c: f"course_lib.exercises.{c.co_name}" for c in refs})
        out[name] = codes
    return out


def _describe(value) -> dict:
    code = getattr(value, "__code__", None)
    return {"defined": True, "callable": callable(value), "type": type(value).__name__,
            "module": str(getattr(value, "__module__", "") or ""),
            "file": str(getattr(code, "co_filename", "")) if code is not None else ""}


def _plain(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.cpu().as_subclass(torch.Tensor).clone()


def _call(fn, trials, codes: dict, seconds: float, Raised, call_learner):
    """fn on each input dict, under a time limit and a profiler that notes calls to the library's answer."""
    used: set = set()

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            used.add(codes[frame.f_code])

    outputs, tampered = [], False
    for inputs in trials:
        try:
            with _Limit(seconds):
                sys.setprofile(profiler)
                try:
                    got = call_learner(fn, inputs)
                finally:
                    tampered |= sys.getprofile() is not profiler
                    sys.setprofile(None)
        except GradingTimeout:
            got = Raised("GradingTimeout", "")
        if isinstance(got, Raised):
            if got.error == "GradingTimeout":
                outputs.append({"timeout": True})
                break  # one time-out is enough: do not spend the limit again on every trial
            outputs.append({"error": got.error, "message": got.message})
        else:
            outputs.append(_plain(got))
    return outputs, sorted(used), tampered


def _run_cell(shell, source: str, seconds: float) -> tuple[str, str]:
    """Run one cell; return (status, message) with status ok / error / timeout."""
    try:
        with _Limit(seconds):
            result = shell.run_cell(source, store_history=False, silent=False)
    except GradingTimeout:
        return "timeout", f"stopped after {seconds:g} s"
    except BaseException as e:  # an exception escaping IPython itself (e.g. in a post-execute hook)
        return "error", f"{type(e).__name__}: {str(e)[:200]}"
    err = result.error_before_exec or result.error_in_exec
    if err is None:
        return "ok", ""
    if isinstance(err, GradingTimeout):
        return "timeout", f"stopped after {seconds:g} s"
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return "error", f"{type(err).__name__}: {text}" if text else type(err).__name__


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    job_in, out = os.fdopen(int(argv[0]), "rb"), os.fdopen(int(argv[1]), "wb")

    def send(**message):
        out.write(encode(message))
        out.flush()

    job = _read_message(job_in)
    from course_lib import sandbox

    sandbox.limit_resources(job["memory_mb"], job["cpu_seconds"], job["file_mb"])
    torch.set_num_threads(job["threads"])
    shell = _prepare()
    codes = _reference_codes(job["names"])
    from course_lib.exercises import Raised, call_learner

    call, describe = _call, _describe  # bound now: a submission rebinding the module's names changes nothing here
    layers = sandbox.confine(job["scratch"])
    send(kind="ready", layers=layers)
    for index, source in job["cells"]:
        send(kind="cell", index=index)
        status, message = _run_cell(shell, source, job["cell_timeout"])
        send(kind="cell_done", index=index, status=status, message=message)
    ns = shell.user_ns
    send(kind="defined", names={n: describe(ns[n]) if n in ns else {"defined": False} for n in job["names"]})
    inputs = _read_message(job_in)
    for name, trials in inputs.items():
        send(kind="call", name=name)
        fn = ns.get(name)
        outputs, used, tampered = call(fn, trials, codes[name], job["call_timeout"], Raised, call_learner)
        send(kind="result", name=name, outputs=outputs, library=used, tampered=tampered)
    send(kind="done")
    out.close()
    os._exit(0)  # skip interpreter teardown: threads or atexit handlers a submission left cannot delay us


if __name__ == "__main__":
    main()
