"""The grading parent's side of one worker: start it confined, feed it cells and calls, serve its oracles, read back.

Everything read from the worker is untrusted: each message is decoded within fixed bounds (course_lib.grading.channel)
and must fit the conversation's order (ready, then each cell started and finished, the names defined, then for each
call its start, its oracle requests and its result, then done). A message out of order, malformed or unexpected ends
the worker, and the submission is flagged. The oracles of a call (course_lib.grading.oracles) live here: a request
is validated and answered here, counted against the call's own budget, and logged; a worker can neither see an
oracle's data nor reset its count. Workers that outlive their grading are killed (this process is their subreaper).
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .channel import MAX_MESSAGE, BadMessage, decode, encode_trusted
from .oracles import BudgetExceeded
from .processes import ACTIVE, ACTIVE_LOCK

SETUP_SECONDS = 120  # the worker's imports, before the first cell
MAX_REFUSED = 50  # refusals kept per attempt
MAX_ORACLE_REQUESTS = 10_000  # per call: far above any budget (a budget's extra requests are refused, then this ends it)


def clean(text, limit: int = 400) -> str:
    """`text` if it is a str, as printable text (surrogates and control characters escaped), at most `limit` long.

    Anything that is not a str gives "": an object from a worker is never formatted here.
    """
    if not isinstance(text, str):
        return ""
    text = text[: limit * 2].encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                   for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def course_root() -> Path:
    return Path(__file__).resolve().parents[2]


class Broken(Exception):
    """The worker's channel carried something that is not a valid message in its place."""


class _Channel:
    """Framed messages from the worker's socket, read with deadlines and decoded within bounds."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, bytearray()

    def recv(self, deadline: float) -> dict:
        while True:
            if len(self.buf) >= 8:
                size = int.from_bytes(self.buf[:8], "little")
                if size > MAX_MESSAGE:
                    raise Broken(f"a message of {size} bytes (limit {MAX_MESSAGE})")
                if len(self.buf) >= 8 + size:
                    payload = bytes(self.buf[8: 8 + size])
                    del self.buf[: 8 + size]
                    try:
                        message = decode(payload)
                    except BadMessage as e:
                        raise Broken(str(e)) from None
                    if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
                        raise Broken("a message that is not a dict with a kind")
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [self.sock], [], left)[1]:
                raise TimeoutError
            view = view[self.sock.send(view):]


def _int(msg: dict, key: str) -> int:
    value = msg.get(key)
    if type(value) is not int:
        raise Broken(f"a message whose {key} is not an int")
    return value


def _refused(msg: dict) -> list[tuple[str, str]]:
    out = []
    for item in (msg.get("refused") or [])[:MAX_REFUSED] if isinstance(msg.get("refused"), list) else []:
        if isinstance(item, list) and len(item) == 2:
            out.append((clean(item[0], 20), clean(item[1], 120)))
    return out


@dataclass
class Call:
    """One call the worker is to make: its inputs (OracleRef placeholders kept), its procedure, its oracles (here)."""

    inputs: dict
    procedure: str | None
    oracles: dict
    seconds: float


@dataclass
class Attempt:
    cells: dict = field(default_factory=dict)  # cell number -> (status, message)
    defined: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)  # exercise name -> [validated output per call received]
    refused: list = field(default_factory=list)  # (kind, what) the sandbox refused
    ended: str = "done"  # done / crashed / timeout / broken
    running: tuple | None = None  # ("cell", n), ("call", name, i), ("setup",), ("calls",) when it ended early
    detail: str = ""
    layers: tuple = ()


def output(raw) -> object:
    """A worker's output for one call, validated: a tensor, {"tensors": {name: tensor}}, {"timeout": True} or
    {"error", "message"} (plain strings)."""
    if isinstance(raw, torch.Tensor):
        return raw
    if isinstance(raw, dict) and raw.get("timeout") is True:
        return {"timeout": True}
    if isinstance(raw, dict) and isinstance(raw.get("tensors"), dict) and len(raw["tensors"]) <= 256:
        tensors = {clean(k, 80): v for k, v in raw["tensors"].items() if isinstance(v, torch.Tensor)}
        if len(tensors) != len(raw["tensors"]):
            raise Broken("a result that is not a dict of tensors")
        return {"tensors": tensors}
    if isinstance(raw, dict):
        return {"error": clean(raw.get("error"), 60), "message": clean(raw.get("message"), 150)}
    raise Broken("an output that is neither a tensor nor an error")


def _argument(value, depth: int = 0):
    """An oracle argument from the worker: tensors, numbers, None (lists of them, shallow), else Broken."""
    if value is None or isinstance(value, (bool, int, float, torch.Tensor)):
        return value
    if isinstance(value, list) and depth == 0 and len(value) <= 64:
        return [_argument(v, 1) for v in value]
    raise Broken("an oracle request with an argument that is not a tensor or a number")


def _answer(oracle, msg: dict) -> dict:
    """The reply to one oracle request (the oracle validates, counts and logs it)."""
    args, kwargs = msg.get("args"), msg.get("kwargs")
    if not isinstance(args, list) or not isinstance(kwargs, dict) or len(args) > 8 or len(kwargs) > 8:
        raise Broken("a malformed oracle request")
    args = [_argument(a) for a in args]
    kwargs = {clean(k, 40): _argument(v) for k, v in kwargs.items()}
    try:
        value = oracle(*args, **kwargs)
    except BudgetExceeded as e:
        return {"error": "BudgetExceeded", "message": str(e)}
    except (ValueError, TypeError) as e:
        return {"error": type(e).__name__, "message": str(e)[:300]}
    except Exception as e:  # an argument the oracle's own check let through but its function cannot use
        return {"error": "ValueError", "message": f"{oracle.name} could not use these arguments ({type(e).__name__})"}
    if not isinstance(value, torch.Tensor):
        return {"error": "ValueError", "message": f"{oracle.name} returned no tensor"}
    return {"value": value.detach().contiguous()}


def _worker_env(scratch: str) -> dict:
    package_root = str(course_root())
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "COURSE_CHECKPOINTS",
                                      "SYSTEMROOT") if k in os.environ}
    env.update(HOME=scratch, TMPDIR=scratch, MPLBACKEND="Agg", COURSE_QUICK="1", COURSE_GRADING="1",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1", TRITON_INTERPRET="1", TRITON_CACHE_DIR=os.path.join(scratch, ".triton"),
               TORCHINDUCTOR_CACHE_DIR=os.path.join(scratch, ".inductor"), TORCHINDUCTOR_COMPILE_THREADS="1",
               PYTHONPATH=os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    try:
        import matplotlib

        env["MPLCONFIGDIR"] = matplotlib.get_configdir()  # its font cache is read, not rebuilt each time
    except Exception:
        pass
    return env


def data_dir() -> str | None:
    try:
        from ..checkpoints import shipped_dir

        return str(shipped_dir())
    except Exception:
        return None


def run_worker(cells, names, make_calls, limits, deadline: float, scratch_base, policy: dict) -> Attempt:
    """Run one confined worker over `cells`, then have it make the calls make_calls(defined) returns ({name: [Call]}),
    serving their oracles. Returns what happened (see Attempt)."""
    att = Attempt()
    scratch = tempfile.mkdtemp(prefix="course-grade-", dir=scratch_base)
    parent_sock, child_sock = socket.socketpair()
    log = open(os.path.join(scratch, "output.log"), "wb")
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    job = {"scratch": scratch, "cells": cells, "names": names, "cell_timeout": limits.cell_timeout,
           "memory_mb": limits.memory_mb, "file_mb": limits.file_mb, "threads": 1,
           "cpu_seconds": int(limits.timeout) + 60, "read": [p for p in (data_dir(),) if p],
           "deny_read": policy["protected"], "blocked_modules": ["course_lib.exercises", "cffi", "_cffi_backend"],
           "layers": {"landlock": limits.landlock, "seccomp": limits.seccomp}}
    try:
        with ACTIVE_LOCK:  # registered before any sweep can see it as a stray
            proc = subprocess.Popen([sys.executable, *flags, "-B", "-m", "course_lib.grading.worker",
                                     str(child_sock.fileno())], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=scratch, env=_worker_env(scratch),
                                    pass_fds=(child_sock.fileno(),), start_new_session=True)
            ACTIVE.add(proc)
    except BaseException:
        parent_sock.close()
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        child_sock.close()
        log.close()
    chan, step = _Channel(parent_sock), min(deadline, time.monotonic() + SETUP_SECONDS)
    sent = [i for i, _ in cells]
    started = -1  # the position in `sent` of the cell running now: it only moves forward
    pending: list = []  # the calls still to come, in order: (name, index)
    calls: dict = {}
    requests = 0
    att.running = ("setup",)
    try:
        chan.send(encode_trusted(job), step)
        while True:
            msg = chan.recv(min(deadline, step))
            kind = msg["kind"]
            att.refused += _refused(msg)
            if kind == "ready" and att.running == ("setup",):
                layers = msg.get("layers") if isinstance(msg.get("layers"), list) else []
                att.layers = tuple(clean(x, 100) for x in layers[:6])
                att.running = None
            elif kind == "cell" and att.running is None:
                index = _int(msg, "index")
                if index not in sent or sent.index(index) <= started:
                    raise Broken("a cell message out of order")
                started = sent.index(index)
                att.running = ("cell", index)
                step = time.monotonic() + limits.cell_timeout + limits.grace
            elif kind == "cell_done":
                if att.running != ("cell", _int(msg, "index")):
                    raise Broken("a cell_done message for a cell that is not running")
                status = msg.get("status") if msg.get("status") in ("ok", "error", "timeout") else "error"
                att.cells[msg["index"]] = (status, clean(msg.get("message"), 200))
                att.running = None
            elif kind == "defined" and att.running is None:
                got = msg.get("names") if isinstance(msg.get("names"), dict) else {}
                att.defined = {n: {"defined": got[n].get("defined") is True, "callable": got[n].get("callable") is True,
                                   "type": clean(got[n].get("type"), 60)}
                               for n in names if isinstance(got.get(n), dict)}
                calls = make_calls(att.defined)
                att.outputs = {n: [] for n in calls}
                pending = [(n, i) for n, todo in calls.items() for i in range(len(todo))]
                att.running = ("calls",)
                step = time.monotonic() + SETUP_SECONDS
                chan.send(encode_trusted({n: [{"inputs": c.inputs, "procedure": c.procedure, "seconds": c.seconds,
                                               "oracles": {o: repr(v) for o, v in c.oracles.items()}} for c in todo]
                                          for n, todo in calls.items()}), step)
            elif kind == "call" and att.running == ("calls",):
                if not pending or (msg.get("name"), msg.get("index")) != pending[0]:
                    raise Broken("a call message out of order")
                name, index = pending.pop(0)
                att.running = ("call", name, index)
                requests = 0
                step = time.monotonic() + calls[name][index].seconds + limits.grace
            elif kind == "oracle" and att.running and att.running[0] == "call":
                _, name, index = att.running
                oracle = calls[name][index].oracles.get(msg.get("oracle"))
                requests += 1
                if oracle is None or requests > MAX_ORACLE_REQUESTS:
                    raise Broken("a request for an oracle this call does not have" if oracle is None
                                 else "a flood of oracle requests")
                chan.send(encode_trusted(_answer(oracle, msg)), step)
            elif kind == "result" and att.running and att.running[0] == "call":
                _, name, index = att.running
                if (msg.get("name"), msg.get("index")) != (name, index):
                    raise Broken("a result message for a call that is not running")
                out = output(msg.get("output"))
                att.outputs[name].append(out)
                if isinstance(out, dict) and out.get("timeout"):  # the worker goes on with the next exercise
                    pending = [p for p in pending if p[0] != name]
                att.running = ("calls",)
                step = time.monotonic() + SETUP_SECONDS
            elif kind == "done" and att.running == ("calls",):
                if pending:
                    raise Broken("a done message before every call was made")
                att.running = None
                break
            else:
                raise Broken(f"an unexpected message ({clean(kind, 20)})")
    except TimeoutError:
        att.ended = "timeout"
    except (EOFError, ConnectionError, BrokenPipeError):
        att.ended = "crashed"
    except (Broken, KeyError, TypeError, ValueError, AttributeError) as e:
        why = clean(str(e), 100) if isinstance(e, Broken) else type(e).__name__
        att.ended, att.detail = "broken", f"the submission corrupted the grader's channel ({why})"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything left in its session
        except (ProcessLookupError, PermissionError):
            pass
        code = proc.wait()
        with ACTIVE_LOCK:
            ACTIVE.discard(proc)  # reaped by wait() above, so a sweep cannot mistake it for a stray
        parent_sock.close()
        if att.ended == "crashed":
            att.detail = _crash_detail(code, os.path.join(scratch, "output.log"))
        keep = os.environ.get("COURSE_GRADER_KEEP_LOGS")  # a folder: keep each worker's output there (debugging)
        if keep:
            shutil.copy(os.path.join(scratch, "output.log"), os.path.join(keep, os.path.basename(scratch) + ".log"))
        shutil.rmtree(scratch, ignore_errors=True)
    att.refused = list(dict.fromkeys(att.refused))[:MAX_REFUSED]
    return att


def read_notebook(fd: int, timeout: float = 120.0) -> tuple[list, dict]:
    """(code cells, metadata) of the notebook open at `fd`, read by course_lib.grading.reader in a process of its own
    under its memory limit; ValueError with the reason when it cannot be read."""
    import json

    from . import reader

    with ACTIVE_LOCK:  # registered, so that a sweep never takes it for a stray
        proc = subprocess.Popen([sys.executable, "-I", "-S", reader.__file__], stdin=fd, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        ACTIVE.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = b""
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        with ACTIVE_LOCK:
            ACTIVE.discard(proc)
    try:
        got = json.loads(out.decode("utf-8")) if len(out) <= 8 * reader.MAX_CODE_BYTES + 4096 else None
    except (ValueError, RecursionError):
        got = None
    if not isinstance(got, dict):
        raise ValueError("not a readable notebook (reading it failed or took too long)")
    if "error" in got:
        raise ValueError(clean(got["error"], 200))
    cells = got.get("cells")
    if not (isinstance(cells, list) and all(isinstance(c, list) and len(c) == 2 and type(c[0]) is int
                                            and isinstance(c[1], str) for c in cells)):
        raise ValueError("not a readable notebook")
    metadata = got.get("metadata") if isinstance(got.get("metadata"), dict) else {}
    return [(i, src) for i, src in cells], metadata


def _crash_detail(code: int, log_path: str) -> str:
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 4000))
            tail = f.read().decode("utf-8", "replace")
        last = [ln.strip() for ln in tail.splitlines() if "Error" in ln or "error" in ln]
        return how + (f"; last error printed: {clean(last[-1], 120)}" if last else "")
    except OSError:
        return how
