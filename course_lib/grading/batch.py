"""Batch grading of untrusted notebooks: each runs confined in its own process; the verdicts are made here.

`python -m course_lib grade SUBMISSION... --out grades.csv [--json results.json] [--jobs N]`. For each notebook a
worker process (course_lib.grading.worker) runs the code cells in quick mode, then calls the learner's functions on
inputs made here from a secret seed, after the notebook has run; this process judges the returned outputs against
its own reference (course_lib.exercises.judge), compares the fingerprints of what the function can reach with the
library's and the references' (course_lib.grading.identity), and reads the notebook's source itself
(course_lib.grading.scan). Everything read from a submission or a worker is bounded and validated here; every
failure of one submission becomes that submission's `error` row; the CSV and JSON are always written. A journal
next to the CSV records each graded submission, so an interrupted batch resumes where it stopped.
"""
from __future__ import annotations

import ast
import csv
import ctypes
import hashlib
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import exercises
from ..checkpoints import write_json_atomic, write_text_atomic
from ..exercises import EXERCISES, LIBRARY_EQUIVALENTS, Raised, judge
from . import identity, scan
from .channel import MAX_MESSAGE, BadMessage, decode, encode_trusted

STATUSES = ("passed", "failed", "not_attempted", "error", "timeout")
COLUMNS = ("submission", "exercise", "points", "max_points", "status", "message", "flag")
WHOLE_NOTEBOOK = "(notebook)"  # the exercise column of the one row of a submission whose lesson is unknown
MAX_NOTEBOOK_BYTES = 32 << 20  # an executed lesson with its plots is 1-3 MB
MAX_CODE_BYTES = 256 << 10  # all code cells together (the longest lesson has 17 kB; parsing costs ~700 B/node)
MAX_CELLS = 2000
MAX_MESSAGE_TEXT = 400  # characters of a row's message
SETUP_SECONDS = 120  # the worker's imports, before the first cell
BLOCKED_MODULES = ("course_lib.exercises",)  # the references: never importable in a worker


@dataclass(frozen=True)
class Limits:
    """Per-submission limits: `timeout` covers the whole submission, every attempt included."""

    timeout: float = 600.0
    cell_timeout: float = 120.0
    call_timeout: float = 20.0
    memory_mb: int = 6144  # address space of the worker (torch alone maps about 1.5 GB)
    file_mb: int = 256
    threads: int = 1
    attempts: int = 3  # a cell that kills the process is skipped and the notebook run again
    grace: float = 10.0  # beyond a cell's or a call's own alarm before the process is killed
    landlock: bool = True  # kernel layers, where the platform has them (off only to test the fallbacks)
    seccomp: bool = True

    def __post_init__(self):
        for name in ("timeout", "cell_timeout", "call_timeout", "memory_mb", "file_mb", "threads", "attempts",
                     "grace"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


# ---- text that is safe to print, write and show ----------------------------------------------------

def clean(text, limit: int = MAX_MESSAGE_TEXT) -> str:
    """`text` if it is a str, as printable text (surrogates and control characters escaped), at most `limit` long.

    Anything that is not a str gives "": an object from a worker is never formatted here.
    """
    if not isinstance(text, str):
        return ""
    text = text[: limit * 2].encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                   for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def display_path(path) -> str:
    """A path as printable text: bytes that are not UTF-8 (a name from an unzipped archive) become \\xNN."""
    raw = os.fsencode(path)
    return clean(raw.decode("utf-8", "backslashreplace"), 1000)


def _row(submission, ex_name, status, message, points=0, max_points=0, flag=""):
    return {"submission": submission, "exercise": ex_name, "points": points, "max_points": max_points,
            "status": status, "message": clean(message), "flag": flag}


# ---- finding and reading submissions --------------------------------------------------------------

@dataclass(frozen=True)
class Submission:
    label: str  # printable, for the CSV and the journal
    path: str  # what to open (a regular file), or "" when `problem` says why it cannot be graded
    problem: str = ""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _candidate(path: str, roots: list[str], follow_symlinks: bool) -> Submission:
    label = display_path(path)
    try:
        st = os.lstat(path)
    except OSError as e:
        return Submission(label, "", f"cannot be read ({e.strerror or type(e).__name__})")
    target = path
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        if not follow_symlinks and not any(_within(target, r) for r in roots):
            return Submission(label, "", "is a symbolic link to a file outside the given folders (not followed; "
                                         "pass --follow-symlinks to grade it)")
        try:
            st = os.stat(target)
        except OSError:
            return Submission(label, "", "is a symbolic link to nothing")
    if not stat.S_ISREG(st.st_mode):
        return Submission(label, "", f"is {_kind(st.st_mode)}, not a notebook file")
    return Submission(label, target)


def find_submissions(paths, follow_symlinks: bool = False) -> list[Submission]:
    """Every notebook named or found under the given folders (checkpoints skipped), in order, each once.

    Entries that cannot be graded (FIFOs, devices, folders named *.ipynb, symbolic links leaving the given
    folders) are returned with a `problem`, so each gets an error row naming it.
    """
    found: list[Submission] = []
    seen: set = set()
    for given in map(os.fspath, paths):
        if not os.path.lexists(given):
            raise ValueError(f"{display_path(given)} does not exist (give notebook files or folders of them)")
        if os.path.isdir(given) and not os.path.islink(given):
            root = os.path.realpath(given)
            items = []
            for folder, dirs, files in os.walk(given, followlinks=False):
                dirs[:] = sorted(d for d in dirs if d != ".ipynb_checkpoints")
                for name in sorted(files + [d for d in dirs if d.endswith(".ipynb")]):
                    if name.endswith(".ipynb"):
                        items.append(_candidate(os.path.join(folder, name), [root], follow_symlinks))
                dirs[:] = [d for d in dirs if not d.endswith(".ipynb")]
        else:
            items = [_candidate(given, [os.path.realpath(os.path.dirname(os.path.abspath(given)))], follow_symlinks)]
        for sub in items:
            key = sub.path or sub.label
            if key not in seen:
                seen.add(key)
                found.append(sub)
    if not found:
        raise ValueError("no notebooks (*.ipynb) found in " + ", ".join(display_path(p) for p in paths))
    return found


def read_submission(path: str) -> bytes:
    """The bytes of a regular file of at most MAX_NOTEBOOK_BYTES (opened without blocking or following a link)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"is {_kind(st.st_mode)}, not a notebook file")
        if st.st_size > MAX_NOTEBOOK_BYTES:
            raise ValueError(f"the file is {st.st_size >> 20} MB, over the {MAX_NOTEBOOK_BYTES >> 20} MB limit")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_NOTEBOOK_BYTES:
                raise ValueError(f"the file is over the {MAX_NOTEBOOK_BYTES >> 20} MB limit")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_cells(data: bytes) -> tuple[list[tuple[int, str]], dict]:
    """The (1-based cell number, source) of every code cell, and the notebook metadata; ValueError if unreadable."""
    if len(data) > MAX_NOTEBOOK_BYTES:
        raise ValueError(f"the file is {len(data) >> 20} MB, over the {MAX_NOTEBOOK_BYTES >> 20} MB limit")
    try:
        nb = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not a readable notebook ({type(e).__name__})") from None
    if not isinstance(nb, dict):
        raise ValueError("not a readable notebook (not a JSON object)")
    raw = nb.get("cells")
    if raw is None and isinstance(nb.get("worksheets"), list) and nb["worksheets"]:  # nbformat 3
        raw = nb["worksheets"][0].get("cells") if isinstance(nb["worksheets"][0], dict) else None
    if not isinstance(raw, list):
        raise ValueError("not a readable notebook (no list of cells)")
    if len(raw) > MAX_CELLS:
        raise ValueError(f"the notebook has {len(raw)} cells, over the limit of {MAX_CELLS}")
    cells, code_bytes = [], 0
    for i, cell in enumerate(raw, 1):
        if not (isinstance(cell, dict) and cell.get("cell_type") == "code"):
            continue
        src = cell.get("source", cell.get("input", ""))
        if isinstance(src, list) and all(isinstance(s, str) for s in src):
            src = "".join(src)
        if not isinstance(src, str):
            continue
        code_bytes += len(src)
        if code_bytes > MAX_CODE_BYTES:
            raise ValueError(f"the code cells hold over {MAX_CODE_BYTES >> 10} kB of code, over the limit")
        cells.append((i, src))
    metadata = nb.get("metadata")
    return cells, metadata if isinstance(metadata, dict) else {}


_DEF_LINE = re.compile(r"^\s*def\s+(\w+)\s*\(", re.M)
_LESSON_PREFIX = re.compile(r"(?:^|[^0-9])(\d{2})_")
CHECK_CALL = re.compile(r"""check\(\s*["'](\w+)["']""")


def lesson_of(cells, metadata: dict, filename: str) -> int | None:
    """The lesson a notebook belongs to: the release stamp, else the exercises it names, else its NN_ prefix."""
    lessons = {ex.lesson for ex in EXERCISES.values()}
    stamp = metadata.get("course_lib")
    stamp = stamp.get("lesson") if isinstance(stamp, dict) else None
    if type(stamp) is int and stamp in lessons:
        return stamp
    named = {n for _, src in cells for n in CHECK_CALL.findall(src) + _DEF_LINE.findall(src)} & set(EXERCISES)
    found = {EXERCISES[n].lesson for n in named}
    if len(found) == 1:
        return found.pop()
    m = _LESSON_PREFIX.search(os.path.basename(filename))
    return int(m.group(1)) if m and int(m.group(1)) in lessons else None


def definitions(cells, names) -> dict[str, list[int]]:
    """For each name, the cells that bind it at top level (def, assignment or import)."""
    where: dict[str, list[int]] = {n: [] for n in names}
    for index, source in cells:
        try:
            bound = set()
            for node in ast.parse(scan.as_python(source)[0]).body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    bound.add(node.name)
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    bound |= {t.id for t in targets if isinstance(t, ast.Name)}
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            bound = set(_DEF_LINE.findall(source))
        for n in bound & set(names):
            where[n].append(index)
    return where


# ---- what the course itself provides ----------------------------------------------------------------

def _course_root() -> Path:
    return Path(__file__).resolve().parents[2]


_RELEASED: dict = {}
_RELEASED_LOCK = threading.Lock()


def released_sources(lesson: int, folder: Path | None = None) -> set[str]:
    """Normalized sources of the released lesson's code cells (the student copy in notebooks/student, or the
    source notebook with its solutions stubbed); empty if neither is found."""
    from .release import student_notebook

    key = (lesson, str(folder))
    with _RELEASED_LOCK:
        if key in _RELEASED:
            return _RELEASED[key]
    import nbformat

    root = _course_root() / "notebooks"
    out: set[str] = set()
    for candidate, stub in ((folder, False), (root / "student", False), (root, True)):
        if candidate is None or not Path(candidate).is_dir():
            continue
        for path in sorted(Path(candidate).glob(f"{lesson:02d}_*.ipynb")):
            try:
                nb = nbformat.read(path, as_version=4)
                if stub:
                    nb, _ = student_notebook(nb, path.name)
            except Exception:
                continue
            out |= {scan.normalize(c.source) for c in nb.cells if c.cell_type == "code"}
        if out:
            break
    with _RELEASED_LOCK:
        _RELEASED[key] = out
    return out


_FINGERPRINTS: dict = {}
_FINGERPRINTS_LOCK = threading.Lock()  # --jobs grades in threads: importing the library twice at once races


def answer_fingerprints() -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """({exercise: {fingerprint: dotted name}} of the library functions that compute each answer,
    {fingerprint: name} of every exercise reference), computed here, never in a worker, once per process (under a
    lock: two threads importing course_lib.autoencoder at once saw it half initialised)."""
    with _FINGERPRINTS_LOCK:
        return _answer_fingerprints()


def _answer_fingerprints():
    if not _FINGERPRINTS:
        library = {name: identity.library_fingerprints({d: identity.resolve(d) for d in dotted})
                   for name, dotted in LIBRARY_EQUIVALENTS.items()}
        refs = identity.library_fingerprints({f"course_lib.exercises.{ex.reference.__name__}": ex.reference
                                              for ex in EXERCISES.values()})
        _FINGERPRINTS.update(library=library, refs=refs)
    return _FINGERPRINTS["library"], _FINGERPRINTS["refs"]


# ---- talking to the worker ----------------------------------------------------------------------

class _Broken(Exception):
    """The worker's channel carried something that is not a valid message."""


class _Channel:
    """Framed messages from the worker's socket, read with deadlines and decoded within bounds."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, bytearray()

    def recv(self, deadline: float) -> dict:
        while True:
            if len(self.buf) >= 8:
                size = int.from_bytes(self.buf[:8], "little")
                if size > MAX_MESSAGE:
                    raise _Broken(f"a message of {size} bytes (limit {MAX_MESSAGE})")
                if len(self.buf) >= 8 + size:
                    payload = bytes(self.buf[8: 8 + size])
                    del self.buf[: 8 + size]
                    try:
                        message = decode(payload)
                    except BadMessage as e:
                        raise _Broken(str(e)) from None
                    if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
                        raise _Broken("a message that is not a dict with a kind")
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
        raise _Broken(f"a message whose {key} is not an int")
    return value


def _refused(msg: dict) -> list[tuple[str, str]]:
    out = []
    for item in (msg.get("refused") or [])[:50] if isinstance(msg.get("refused"), list) else []:
        if isinstance(item, list) and len(item) == 2:
            out.append((clean(item[0], 20), clean(item[1], 120)))
    return out


@dataclass
class _Attempt:
    cells: dict = field(default_factory=dict)  # cell number -> (status, message)
    defined: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)  # exercise name -> validated result
    refused: list = field(default_factory=list)  # (kind, what) the sandbox refused
    ended: str = "done"  # done / crashed / timeout / broken
    running: tuple | None = None  # ("cell", n), ("call", name), ("setup",) when it ended early
    detail: str = ""
    layers: tuple = ()


_ACTIVE: set = set()  # worker processes running now (killed on Ctrl-C)
_ACTIVE_LOCK = threading.Lock()


def _worker_env(scratch: str, threads: int) -> dict:
    package_root = str(_course_root())
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "COURSE_CHECKPOINTS",
                                      "SYSTEMROOT") if k in os.environ}
    env.update(HOME=scratch, TMPDIR=scratch, MPLBACKEND="Agg", COURSE_QUICK="1", COURSE_GRADING="1",
               CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONDONTWRITEBYTECODE="1",
               TRITON_INTERPRET="1", TRITON_CACHE_DIR=os.path.join(scratch, ".triton"),
               TORCHINDUCTOR_CACHE_DIR=os.path.join(scratch, ".inductor"), TORCHINDUCTOR_COMPILE_THREADS="1",
               PYTHONPATH=os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    mpl = _matplotlib_cache()
    if mpl:
        env["MPLCONFIGDIR"] = mpl
    return env


def _matplotlib_cache() -> str | None:
    """The grader's matplotlib config folder: a worker reads its font cache instead of rebuilding it each time."""
    try:
        import matplotlib

        return matplotlib.get_configdir()
    except Exception:
        return None


def _protected_paths(policy: dict) -> list[str]:
    """What no worker may read: the course's notebooks (solutions), the exercise references (the whole package, its
    bytecode cache included), the submissions, the output folder with its journal, and the other workers' scratch
    folders."""
    root = _course_root()
    return [str(root / "notebooks"), str(Path(exercises.__file__).resolve().parent), *policy.get("deny", [])]


def _run_worker(cells, names, make_inputs, limits: Limits, deadline: float, scratch_base, policy: dict) -> _Attempt:
    """Run one confined worker over `cells`, then have it call `names` on make_inputs(defined) (see module doc)."""
    att = _Attempt()
    scratch = tempfile.mkdtemp(prefix="course-grade-", dir=scratch_base)
    parent_sock, child_sock = socket.socketpair()
    log = open(os.path.join(scratch, "output.log"), "wb")
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    job = {"scratch": scratch, "cells": cells, "names": names, "cell_timeout": limits.cell_timeout,
           "call_timeout": limits.call_timeout, "memory_mb": limits.memory_mb, "file_mb": limits.file_mb,
           "threads": limits.threads, "cpu_seconds": int(limits.timeout * limits.threads) + 60,
           "equivalents": {n: list(LIBRARY_EQUIVALENTS.get(n, ())) for n in names},
           "harness": {n: EXERCISES[n].harness for n in names if n in EXERCISES and EXERCISES[n].harness},
           "call_seconds": {n: call_seconds(limits, n) for n in names},
           "read": [p for p in (_data_dir(),) if p], "deny_read": _protected_paths(policy),
           "blocked_paths": [], "blocked_modules": list(BLOCKED_MODULES),
           "layers": {"landlock": limits.landlock, "seccomp": limits.seccomp}}
    try:
        with _ACTIVE_LOCK:  # registered before any sweep can see it as a stray
            proc = subprocess.Popen([sys.executable, *flags, "-B", "-m", "course_lib.grading.worker",
                                     str(child_sock.fileno())], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=scratch, env=_worker_env(scratch, limits.threads),
                                    pass_fds=(child_sock.fileno(),), start_new_session=True)
            _ACTIVE.add(proc)
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
    pending = list(names)  # the calls still to come, in order
    att.running = ("setup",)
    try:
        chan.send(encode_trusted(job), step)
        while True:
            msg = chan.recv(min(deadline, step))
            kind = msg["kind"]
            att.refused += _refused(msg)
            if kind == "ready":
                layers = msg.get("layers") if isinstance(msg.get("layers"), list) else []
                att.layers = tuple(clean(x, 100) for x in layers[:6])
                att.running = None
            elif kind == "cell":
                index = _int(msg, "index")
                if index not in sent or sent.index(index) <= started:
                    raise _Broken("a cell message out of order")
                started = sent.index(index)
                att.running = ("cell", index)
                step = time.monotonic() + limits.cell_timeout + limits.grace
            elif kind == "cell_done":
                if att.running != ("cell", _int(msg, "index")):
                    raise _Broken("a cell_done message for a cell that is not running")
                status = msg.get("status") if msg.get("status") in ("ok", "error", "timeout") else "error"
                att.cells[msg["index"]] = (status, clean(msg.get("message"), 200))
                att.running = None
            elif kind == "defined" and att.running is None:
                got = msg.get("names") if isinstance(msg.get("names"), dict) else {}
                att.defined = {n: {"defined": got[n].get("defined") is True, "callable": got[n].get("callable") is True,
                                   "type": clean(got[n].get("type"), 60)}
                               for n in names if isinstance(got.get(n), dict)}
                att.running = ("inputs",)
                step = time.monotonic() + SETUP_SECONDS
                chan.send(encode_trusted(make_inputs(att.defined)), step)
                pending = [n for n in names if att.defined.get(n, {}).get("callable")]
            elif kind == "call":
                if not pending or msg.get("name") != pending[0]:
                    raise _Broken("a call message out of order")
                att.running = ("call", pending.pop(0))
                step = time.monotonic() + call_seconds(limits, att.running[1]) * 5 + limits.grace
            elif kind == "result":
                if att.running is None or att.running[0] != "call" or msg.get("name") != att.running[1]:
                    raise _Broken("a result message for a function that is not being called")
                att.results[att.running[1]] = _result(msg)
                att.running = ("inputs",)
            elif kind == "done":
                if pending or att.running != ("inputs",):
                    raise _Broken("a done message before every function was called")
                att.running = None
                break
            else:
                raise _Broken(f"an unexpected message ({clean(kind, 20)})")
    except TimeoutError:
        att.ended = "timeout"
    except (EOFError, ConnectionError, BrokenPipeError):
        att.ended = "crashed"
    except (_Broken, KeyError, TypeError, ValueError, AttributeError) as e:
        why = clean(str(e), 100) if isinstance(e, _Broken) else type(e).__name__
        att.ended, att.detail = "broken", f"the submission corrupted the grader's channel ({why})"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything left in its session
        except (ProcessLookupError, PermissionError):
            pass
        code = proc.wait()
        with _ACTIVE_LOCK:
            _ACTIVE.discard(proc)  # reaped by wait() above, so a sweep cannot mistake it for a stray
        parent_sock.close()
        if att.ended == "crashed":
            att.detail = _crash_detail(code, os.path.join(scratch, "output.log"))
        keep = os.environ.get("COURSE_GRADER_KEEP_LOGS")  # a folder: keep each worker's output there (debugging)
        if keep:
            shutil.copy(os.path.join(scratch, "output.log"), os.path.join(keep, os.path.basename(scratch) + ".log"))
        shutil.rmtree(scratch, ignore_errors=True)
    return att


def _result(msg: dict) -> dict:
    """A worker's result message, validated: outputs are tensors or small dicts; the rest plain strings."""
    outputs = msg.get("outputs")
    if not isinstance(outputs, list) or len(outputs) > 64:
        raise _Broken("a result without a list of outputs")
    checked = []
    for out in outputs:
        if isinstance(out, torch.Tensor):
            checked.append(out)
        elif isinstance(out, dict) and out.get("timeout") is True:
            checked.append({"timeout": True})
        elif isinstance(out, dict) and isinstance(out.get("harness"), dict) and len(out["harness"]) <= 256:
            tensors = {clean(k, 80): v for k, v in out["harness"].items() if isinstance(v, torch.Tensor)}
            if len(tensors) != len(out["harness"]):
                raise _Broken("a harness output that is not a dict of tensors")
            checked.append({"harness": tensors})
        elif isinstance(out, dict):
            checked.append({"error": clean(out.get("error"), 60), "message": clean(out.get("message"), 150)})
        else:
            raise _Broken("an output that is neither a tensor nor an error")
    prints = msg.get("fingerprints") if isinstance(msg.get("fingerprints"), list) else []
    return {"outputs": checked,
            "library": [clean(x, 80) for x in (msg.get("library") if isinstance(msg.get("library"), list) else [])[:20]],
            "fingerprints": {x for x in prints[: identity.MAX_CODES] if isinstance(x, str) and len(x) == 64},
            "evidence": [clean(x, 150) for x in (msg.get("evidence") if isinstance(msg.get("evidence"), list) else [])[:20]],
            "subclass": msg.get("subclass") is True}


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


def _data_dir() -> str | None:
    try:
        from ..checkpoints import shipped_dir

        return str(shipped_dir())
    except Exception:
        return None


# ---- processes that outlive their worker ------------------------------------------------------------

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


class _Reaper:
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
        with _ACTIVE_LOCK:  # no worker is started or finished while the strays are told apart and killed
            strays = _children() - {p.pid for p in _ACTIVE} - self.before
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


# ---- verdicts ------------------------------------------------------------------------------------

def call_seconds(limits: Limits, name: str) -> float:
    """The time limit for one call of exercise `name`: --call-timeout, or more for an exercise that trains."""
    ex = EXERCISES.get(name)
    return max(limits.call_timeout, ex.seconds or 0.0) if ex is not None else limits.call_timeout


def _judge_outputs(sub: str, ex, inputs: list[dict], result: dict, limits: Limits) -> dict:
    """The row for one exercise from the worker's raw outputs, judged against the reference here."""
    outputs = result["outputs"]
    if not outputs or len(outputs) > len(inputs):
        return _row(sub, ex.name, "error", "the grader received no usable outputs for this function", 0, ex.points)
    for trial, (kw, got) in enumerate(zip(inputs, outputs)):
        if isinstance(got, dict) and got.get("timeout"):
            return _row(sub, ex.name, "timeout", f"your function did not return within {call_seconds(limits, ex.name):g}"
                        f" s on random test {trial + 1}.", 0, ex.points)
        if isinstance(got, dict) and "harness" in got:
            got = got["harness"]
        elif isinstance(got, dict):
            got = Raised(got["error"], got["message"])
        try:
            verdict = judge(ex, kw, exercises.reference_output(ex, kw), got, trial)
        except Exception as e:  # judging a behaviour exercise runs library code on the learner's weights
            return _row(sub, ex.name, "error", f"the grader could not assess the result ({type(e).__name__}: "
                        f"{clean(str(e), 120)})", 0, ex.points)
        if verdict is not None:
            message = verdict.message + (f" Hint: {verdict.hint}" if verdict.hint else "")
            return _row(sub, ex.name, verdict.status, message, 0, ex.points)
    if len(outputs) < len(inputs):
        return _row(sub, ex.name, "error", "the grader received outputs for only some tests", 0, ex.points)
    return _row(sub, ex.name, "passed", exercises.passed(ex).message, ex.points, ex.points)


def _copy_evidence(name: str, result: dict | None, source: list) -> list[str]:
    """Why this exercise's function looks copied from course_lib rather than written (empty when it does not)."""
    library, refs = answer_fingerprints()
    why = [str(f) for f in source]
    if result:
        why += [f"calls {d} while graded" for d in result["library"]]
        why += [f"contains the code of {library[name][fp]}" for fp in result["fingerprints"] & set(library.get(name, {}))]
        why += [f"contains the code of {refs[fp]}" for fp in result["fingerprints"] & set(refs)]
        why += [f"reaches {e}" for e in result["evidence"] if not e.startswith("an object that raised")]
        if result["subclass"]:
            why.append("returns a torch.Tensor subclass")
    return list(dict.fromkeys(why))


def _flag(row: dict, flag: str, why: list[str], record: dict | None = None) -> None:
    """Zero a row and flag it for review, saying why (the judged message is kept when it already failed); every
    reason goes into the record's `findings`."""
    if record is not None:
        record.setdefault("findings", {})[row["exercise"]] = [clean(w, 200) for w in why[:30]]
    reasons = "; ".join(why[:2]) + (f"; and {len(why) - 2} more (see the JSON)" if len(why) > 2 else "")
    if row["status"] == "passed":
        row["status"] = "failed"
        text = (f"matches the reference, but {reasons}: 0 points, flagged for review." if flag == "library_reference"
                else f"matches the reference, but the notebook {reasons}: 0 points, flagged for review.")
        row["message"] = clean(text)
    else:  # the reason first: the judged message and its hint may be cut at the length limit
        row["message"] = clean(f"Flagged for review: {reasons}. {row['message']}")
    row["points"], row["flag"] = 0, flag


def _cell_reason(att: _Attempt) -> str:
    if att.ended == "timeout":
        return "it ran past the time limit and ignored the alarm"
    if att.ended == "broken":
        return att.detail
    return "it ended the grading process (" + (att.detail or "no reason given") + ")"


def _missing_row(sub, ex, where, att: _Attempt | None, skipped: dict, out_of_time: bool) -> dict:
    """The row for an exercise that got no outputs: never defined, defined by a failing cell, or out of time."""
    cells = where.get(ex.name, [])
    info = (att.defined.get(ex.name) if att else None) or {}
    if out_of_time:
        return _row(sub, ex.name, "timeout", "the notebook used up its time limit before this exercise was graded.",
                    0, ex.points)
    if info.get("defined") and not info.get("callable"):
        return _row(sub, ex.name, "failed", f"`{ex.name}` is not a function (it is of type {info.get('type') or '?'}).",
                    0, ex.points)
    if not cells:
        return _row(sub, ex.name, "not_attempted", f"no cell defines `{ex.name}` (was its cell deleted?).", 0, ex.points)
    status, why = "failed", []
    for c in cells:
        if c in skipped:
            why.append(f"cell {c} was skipped: {skipped[c]}")
        elif att and c in att.cells and att.cells[c][0] != "ok":
            s, m = att.cells[c]
            status = "timeout" if s == "timeout" else status
            why.append(f"cell {c} " + ("timed out" if s == "timeout" else f"raised {m}"))
    if att is None or att.ended != "done" and not why:
        return _row(sub, ex.name, "error", "the grading process ended before this exercise was graded"
                    + (f" ({att.detail})" if att and att.detail else "") + ".", 0, ex.points)
    return _row(sub, ex.name, status, f"`{ex.name}` was not defined when the notebook finished"
                + (": " + "; ".join(why) if why else "") + ".", 0, ex.points)


def _error_record(sub: Submission, message: str, sha: str = "", lesson=None, retry: bool = False) -> dict:
    expected = [ex for ex in EXERCISES.values() if ex.lesson == lesson] if lesson is not None else []
    rows = [_row(sub.label, ex.name, "error", message, 0, ex.points) for ex in expected] or [
        _row(sub.label, WHOLE_NOTEBOOK, "error", message)]
    return {"submission": sub.label, "sha256": sha, "lesson": lesson, "rows": rows, "seconds": 0.0,
            "notes": [clean(message)], "refused": [], "sandbox": [], **({"retry": True} if retry else {})}


def grade_notebook(path, name: str | None = None, limits: Limits = Limits(), scratch_base=None,
                   seed: int | None = None, policy: dict | None = None) -> dict:
    """Grade one submission; returns {submission, sha256, lesson, rows, seconds, notes, sandbox}."""
    sub = path if isinstance(path, Submission) else Submission(name or display_path(path), os.fspath(path))
    policy = policy or {}
    start = time.monotonic()
    by_name = lesson_of([], {}, sub.label)
    if sub.problem:
        return _error_record(sub, f"{sub.label} {sub.problem}", lesson=by_name)
    try:
        data = read_submission(sub.path)
    except (OSError, ValueError) as e:
        return _error_record(sub, f"{sub.label} cannot be read: {clean(getattr(e, 'strerror', None) or str(e), 150)}",
                             lesson=by_name)
    sha = hashlib.sha256(data).hexdigest()
    try:
        cells, metadata = read_cells(data)
    except ValueError as e:
        return _error_record(sub, f"{sub.label}: {clean(str(e), 150)}", sha, by_name)
    del data
    lesson = lesson_of(cells, metadata, sub.label)
    record = {"submission": sub.label, "sha256": sha, "lesson": lesson, "rows": [], "seconds": 0.0, "notes": [],
              "refused": [], "sandbox": []}
    expected = [ex for ex in EXERCISES.values() if ex.lesson == lesson]
    if lesson is None:
        return _error_record(sub, f"{sub.label}: could not tell which lesson this notebook is (no exercise names, "
                                  "no NN_ file prefix).", sha)
    names = [ex.name for ex in expected]
    where = definitions(cells, names)
    tamper, copied = scan.scan(cells, released_sources(lesson, policy.get("released")),
                               {n: set(LIBRARY_EQUIVALENTS.get(n, ())) for n in names},
                               {ex.reference.__name__ for ex in EXERCISES.values()})
    inputs = {ex.name: exercises.fresh_inputs(ex, None if seed is None else seed + i)  # None: a secret seed
              for i, ex in enumerate(expected)}
    rows: dict[str, dict] = {}
    skipped: dict[int, str] = {}
    deadline = start + limits.timeout
    att = None
    refused: list = []
    for _ in range(limits.attempts):
        todo = [n for n in names if n not in rows]
        if not todo or time.monotonic() >= deadline:
            break
        att = _run_worker([(i, s) for i, s in cells if i not in skipped], todo,
                          lambda defined: {n: inputs[n] for n in todo if (defined.get(n) or {}).get("callable")},
                          limits, deadline, scratch_base, policy)
        refused += att.refused
        record["sandbox"] = list(att.layers)
        for n, result in att.results.items():
            if n in todo:
                rows[n] = _judge_outputs(sub.label, EXERCISES[n], inputs[n], result, limits)
                why = _copy_evidence(n, result, copied.get(n, []))
                if why:
                    _flag(rows[n], "library_reference", why, record)
        if att.ended == "done":
            break
        kind = att.running[0] if att.running else None
        if kind == "cell":
            cell = att.running[1]
            skipped[cell] = _cell_reason(att)
            record["notes"].append(f"cell {cell} was skipped and the notebook run again: {skipped[cell]}")
        elif kind == "call" and att.running[1] in todo and att.running[1] not in rows:
            n = att.running[1]
            ex = EXERCISES[n]
            rows[n] = (_row(sub.label, n, "timeout", f"your function did not return within {call_seconds(limits, n):g} s "
                            "and ignored the alarm.", 0, ex.points) if att.ended == "timeout" else
                       _row(sub.label, n, "failed", "calling your function ended the grading process "
                            f"({att.detail or att.ended}).", 0, ex.points))
        elif kind != "inputs":
            break  # it died before running any cell, or broke the channel: running it again would not help
    out_of_time = time.monotonic() >= deadline and (att is None or att.ended != "done")
    if att is not None:
        record["notes"] += [f"cell {c} {'timed out' if s == 'timeout' else 'raised ' + m}"
                            for c, (s, m) in sorted(att.cells.items()) if s != "ok"]
        if att.ended == "broken":
            tamper.append(scan.Finding("tamper", "corrupted the grader's channel", 0))
    refused = list(dict.fromkeys(refused))
    record["refused"] = [f"{what} ({kind})" for kind, what in refused[:20] if kind != "library"]
    record["notes"] += [f"{what} while graded" for kind, what in refused[:5] if kind == "library"]
    tamper_why = [str(f) for f in tamper] + [f"tried {what}" for kind, what in refused if kind == "tamper"]
    for ex in expected:
        if ex.name not in rows:
            rows[ex.name] = _missing_row(sub.label, ex, where, att, skipped, out_of_time)
            why = [str(f) for f in copied.get(ex.name, [])]
            if why and rows[ex.name]["status"] != "not_attempted":
                _flag(rows[ex.name], "library_reference", why, record)
        row = rows[ex.name]
        dup = where.get(ex.name, [])
        if len(dup) > 1:
            row["message"] = clean(row["message"] + f" (`{ex.name}` is defined in cells {', '.join(map(str, dup[:8]))}; "
                                   "the last one ran counts.)")
        if skipped and row["status"] != "not_attempted":
            row["message"] = clean(row["message"] + " Graded with " + "; ".join(
                f"cell {c} skipped ({r})" for c, r in list(skipped.items())[:3]) + ".")
        if tamper_why and row["flag"] != "library_reference":
            _flag(row, "tampered", tamper_why, record)
    record["rows"] = [rows[n] for n in names]
    record["notes"] = [clean(n) for n in record["notes"]]
    record["seconds"] = round(time.monotonic() - start, 2)
    return record


def _grade_safely(sub: Submission, limits, scratch_base, policy) -> dict:
    """grade_notebook, with any failure of the grader itself on this submission as its error rows (retried later)."""
    try:
        return grade_notebook(sub, None, limits, scratch_base, policy=policy)
    except Exception as e:
        return _error_record(sub, f"the grader failed on {sub.label} ({type(e).__name__}: {clean(str(e), 150)})",
                             _sha(sub), retry=True)


# ---- a batch -------------------------------------------------------------------------------------

def journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".journal")


def _read_journal(path: Path) -> dict:
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                if not rec.get("retry"):  # the grader itself failed on it last time: grade it again
                    done[(rec["submission"], rec["sha256"])] = rec
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                continue  # a line cut short by an interruption: that submission is graded again
    return done


def _spreadsheet_safe(value):
    """A text cell a spreadsheet would run as a formula (=, +, -, @ first) gets a leading apostrophe (OWASP)."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _csv_text(rows) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _spreadsheet_safe(clean(v, 2000) if isinstance(v, str) else v) for k, v in row.items()}
                     for row in rows)
    return buf.getvalue()


def summarize(records) -> dict:
    """Totals over submissions: points, and how many rows have each status."""
    rows = [r for rec in records for r in rec["rows"]]
    return {"submissions": len(records), "points": sum(r["points"] for r in rows),
            "max_points": sum(r["max_points"] for r in rows),
            "status": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
            "flagged": sum(bool(r["flag"]) for r in rows),
            "ungradable": sorted({rec["submission"] for rec in records if any(r["status"] == "error" for r in rec["rows"])})}


def _sha(sub: Submission) -> str:
    if not sub.path:
        return ""
    try:
        return hashlib.sha256(read_submission(sub.path)).hexdigest()
    except (OSError, ValueError):
        return ""


def _say(echo, text: str) -> None:
    """echo(text), escaped to what the terminal's encoding can show (a Latin-1 console and a Chinese file name)."""
    text = clean(text, 2000)
    try:
        echo(text)
    except UnicodeEncodeError:
        echo(text.encode("ascii", "backslashreplace").decode("ascii"))


def _deny_list(paths, subs, outputs, base) -> list[str]:
    """What a worker must not read: every submission, the grader's outputs and journal, the batch's scratch, and
    each given folder unless it holds the course itself (then its notebooks are denied one by one)."""
    keep = [str(_course_root()), *filter(None, [_data_dir()]), sys.prefix]
    deny = {str(base)} | {os.path.realpath(s.path) for s in subs if s.path}
    deny |= {os.path.realpath(os.fspath(p)) for p in outputs if p}
    for p in map(os.fspath, paths):
        real = os.path.realpath(p)
        if not any(_within(k, real) for k in keep):
            deny.add(real)
    return sorted(deny)


def grade_batch(paths, out, json_out=None, limits: Limits | None = None, jobs: int = 1, force: bool = False,
                scratch_base=None, echo=print, follow_symlinks: bool = False, released=None) -> tuple[list[dict], dict]:
    """Grade every submission (resuming from the journal), write the CSV (and JSON); return (records, totals)."""
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if os.name != "posix":
        raise ValueError("the grader confines submissions with POSIX features: run it on Linux or macOS "
                         "(on Windows, inside WSL or the container described in the README)")
    limits = limits or Limits(threads=max(1, (os.cpu_count() or 1) // jobs))
    subs = find_submissions(paths, follow_symlinks)
    out = Path(out)
    journal = journal_path(out)
    for target in filter(None, [out, json_out and Path(json_out)]):
        if target.exists() and not journal.exists() and not force:
            raise ValueError(f"{target} exists and is not from an earlier grading run (no {journal.name} next to it); "
                             "pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    if force and journal.exists():
        journal.unlink()
    done = _read_journal(journal)
    keyed = [(sub, _sha(sub)) for sub in subs]
    todo = [sub for sub, sha in keyed if (sub.label, sha) not in done or not sha]
    say = lambda text: _say(echo, text)  # noqa: E731  (labels may hold anything a file name can)
    say(f"{len(subs)} submission(s): {len(subs) - len(todo)} already graded in {display_path(journal)}, "
        f"{len(todo)} to grade with {jobs} job(s)")
    base = Path(tempfile.mkdtemp(prefix="course-grade-batch-", dir=scratch_base))  # 0700: workers see only their own
    policy = {"deny": _deny_list(paths, subs, [out, journal, json_out], base), "released": released}
    reaper = _Reaper()
    lock = threading.Lock()
    try:
        with open(journal, "a", encoding="utf-8") as jf, ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_grade_safely, sub, limits, base, policy): sub for sub in todo}
            try:
                for k, fut in enumerate(as_completed(futures), 1):
                    sub = futures[fut]
                    try:
                        rec = fut.result()
                    except Exception as e:  # a bug here must not cost the other submissions their rows
                        rec = _error_record(sub, f"the grader failed on {sub.label} ({type(e).__name__})", _sha(sub),
                                            retry=True)
                    reaper.sweep()
                    with lock:
                        jf.write(json.dumps(rec) + "\n")
                        jf.flush()
                        os.fsync(jf.fileno())
                        done[(rec["submission"], rec["sha256"])] = rec
                    got = sum(r["points"] for r in rec["rows"])
                    most = sum(r["max_points"] for r in rec["rows"])
                    counts = ", ".join(f"{sum(r['status'] == s for r in rec['rows'])} {s}" for s in STATUSES
                                       if any(r["status"] == s for r in rec["rows"]))
                    say(f"[{k}/{len(todo)}] {rec['submission']}: {got}/{most} points ({counts}) in {rec['seconds']:.1f} s")
            except BaseException:
                for f in futures:
                    f.cancel()
                with _ACTIVE_LOCK:
                    for proc in list(_ACTIVE):
                        try:
                            os.killpg(proc.pid, signal.SIGKILL)
                        except (ProcessLookupError, PermissionError):
                            pass
                raise
    finally:
        reaper.close()
        shutil.rmtree(base, ignore_errors=True)
        records = [done[(sub.label, sha)] for sub, sha in keyed if (sub.label, sha) in done]
        totals = summarize(records)
        write_text_atomic(_csv_text([r for rec in records for r in rec["rows"]]), out)
        if json_out:
            write_json_atomic({"totals": totals, "submissions": records}, json_out)
    return records, totals


def main_grade(args) -> int:
    """The `grade` command: exit 0 when every submission was graded, 1 when some could not be."""
    limits = Limits(timeout=args.timeout, cell_timeout=min(args.cell_timeout, args.timeout),
                    call_timeout=args.call_timeout, memory_mb=args.memory_mb,
                    threads=max(1, (os.cpu_count() or 1) // max(1, args.jobs)))
    start = time.monotonic()
    records, totals = grade_batch(args.submissions, args.out, args.json, limits, args.jobs, args.force, args.scratch,
                                  follow_symlinks=args.follow_symlinks, released=args.released)
    s = totals["status"]
    _say(print, f"Graded {totals['submissions']} submission(s) in {time.monotonic() - start:.0f} s: "
                f"{totals['points']}/{totals['max_points']} points; " + ", ".join(f"{v} {k}" for k, v in s.items() if v)
                + (f"; {totals['flagged']} flagged for review" if totals["flagged"] else ""))
    _say(print, f"Wrote {display_path(args.out)}" + (f" and {display_path(args.json)}" if args.json else ""))
    if totals["ungradable"]:
        _say(print, f"{len(totals['ungradable'])} submission(s) could not be graded in full (status error): "
                    + ", ".join(totals["ungradable"][:10]) + (" ..." if len(totals["ungradable"]) > 10 else ""))
        return 1
    return 0
