"""Batch grading of untrusted notebooks: each runs confined in its own process, and the verdicts are made here.

`python -m course_lib grade SUBMISSION... --out grades.csv [--json results.json] [--timeout S] [--jobs N]`.
For each notebook a worker process (course_lib.grading_worker) runs the code cells in quick mode, then calls
the learner's functions on inputs made here from a secret seed, after the notebook has run; this process
compares the returned outputs with its own reference (course_lib.exercises.judge). Nothing the submission
does in its process (patching `check`, editing course_lib in memory, printing "passed") reaches this one.
A journal next to the CSV records each graded submission, so an interrupted batch resumes where it stopped.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from . import exercises
from .checkpoints import write_json_atomic, write_text_atomic
from .exercises import EXERCISES, Raised, judge
from .grading_worker import MAX_MESSAGE, decode, encode
from .release import CHECK_CALL

STATUSES = ("passed", "failed", "not_attempted", "error", "timeout")
COLUMNS = ("submission", "exercise", "points", "max_points", "status", "message", "flag")
WHOLE_NOTEBOOK = "(notebook)"  # the exercise column of the one row of a submission whose lesson is unknown
MAX_NOTEBOOK_BYTES = 100 << 20
SETUP_SECONDS = 120  # the worker's imports, before the first cell


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

    def __post_init__(self):
        for name in ("timeout", "cell_timeout", "call_timeout", "memory_mb", "file_mb", "threads", "attempts",
                     "grace"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def _row(submission, ex_name, status, message, points=0, max_points=0, flag=""):
    return {"submission": submission, "exercise": ex_name, "points": points, "max_points": max_points,
            "status": status, "message": message, "flag": flag}


# ---- reading a submission ------------------------------------------------------------------------

_DEF_LINE = re.compile(r"^\s*def\s+(\w+)\s*\(", re.M)
_LESSON_PREFIX = re.compile(r"(?:^|[^0-9])(\d{2})_")


def read_cells(data: bytes) -> tuple[list[tuple[int, str]], dict]:
    """The (1-based cell number, source) of every code cell, and the notebook metadata; ValueError if unreadable."""
    import nbformat

    if len(data) > MAX_NOTEBOOK_BYTES:
        raise ValueError(f"the file is {len(data) >> 20} MB, over the {MAX_NOTEBOOK_BYTES >> 20} MB limit")
    try:
        nb = nbformat.reads(data.decode("utf-8"), as_version=4)
    except Exception as e:
        raise ValueError(f"not a readable notebook ({type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''})") from None
    cells = []
    for i, cell in enumerate(nb.get("cells") or [], 1):
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            src = cell.get("source", "")
            src = "".join(src) if isinstance(src, list) else src
            if isinstance(src, str):
                cells.append((i, src))
    metadata = nb.get("metadata")
    return cells, metadata if isinstance(metadata, dict) else {}


def lesson_of(cells, metadata: dict, filename: str) -> int | None:
    """The lesson a notebook belongs to: the release stamp, else the exercises it names, else its NN_ prefix."""
    lessons = {ex.lesson for ex in EXERCISES.values()}
    stamp = (metadata.get("course_lib") or {}).get("lesson") if isinstance(metadata.get("course_lib"), dict) else None
    if isinstance(stamp, int) and stamp in lessons:
        return stamp
    named = {n for _, src in cells for n in CHECK_CALL.findall(src) + _DEF_LINE.findall(src)} & set(EXERCISES)
    found = {EXERCISES[n].lesson for n in named}
    if len(found) == 1:
        return found.pop()
    m = _LESSON_PREFIX.search(Path(filename).name)
    return int(m.group(1)) if m and int(m.group(1)) in lessons else None


def _as_python(source: str) -> str:
    """IPython magics and shell escapes become `pass`, so the cell parses as Python with the same line numbers."""
    return "\n".join(line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip()[:1] in ("%", "!") else line
                     for line in source.splitlines())


def definitions(cells, names) -> dict[str, list[int]]:
    """For each name, the cells that bind it at top level (def, assignment or import)."""
    where: dict[str, list[int]] = {n: [] for n in names}
    for index, source in cells:
        try:
            bound = set()
            for node in ast.parse(_as_python(source)).body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    bound.add(node.name)
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    bound |= {t.id for t in targets if isinstance(t, ast.Name)}
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        except SyntaxError:
            bound = set(_DEF_LINE.findall(source))
        for n in bound & set(names):
            where[n].append(index)
    return where


# ---- talking to the worker -----------------------------------------------------------------------


class _Broken(Exception):
    """The worker's channel carried something that is not a valid message."""


class _Channel:
    """Framed messages from the worker's pipe, read with deadlines."""

    def __init__(self, fd: int):
        self.fd, self.buf = fd, bytearray()

    def recv(self, deadline: float):
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
                    except Exception as e:
                        raise _Broken(f"an unreadable message ({type(e).__name__})") from None
                    if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
                        raise _Broken("a message that is not a dict with a kind")
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                raise EOFError
            self.buf += chunk


def _send(fd: int, data: bytes, deadline: float) -> None:
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [fd], [], left)[1]:
            raise TimeoutError
        view = view[os.write(fd, view):]


@dataclass
class _Attempt:
    cells: dict  # cell number -> (status, message)
    defined: dict
    results: dict  # exercise name -> the worker's result message
    ended: str = "done"  # done / crashed / timeout / broken
    running: tuple | None = None  # ("cell", n), ("call", name), ("setup",) when it ended early
    detail: str = ""
    layers: tuple = ()


_ACTIVE: set = set()  # worker processes running now (killed on Ctrl-C)
_ACTIVE_LOCK = threading.Lock()


def _worker_env(scratch: str, threads: int) -> dict:
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "COURSE_CHECKPOINTS",
                                      "SYSTEMROOT") if k in os.environ}
    env.update(HOME=scratch, TMPDIR=scratch, MPLBACKEND="Agg", COURSE_QUICK="1", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONDONTWRITEBYTECODE="1",
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


def _run_worker(cells, names, make_inputs, limits: Limits, deadline: float, scratch_base=None) -> _Attempt:
    """Run one confined worker over `cells`, then have it call `names` on make_inputs(defined) (see module doc)."""
    att = _Attempt({}, {}, {})
    scratch = tempfile.mkdtemp(prefix="course-grade-", dir=scratch_base)
    job_r, job_w = os.pipe()
    out_r, out_w = os.pipe()
    log = open(os.path.join(scratch, "output.log"), "wb")
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    job = {"scratch": scratch, "cells": cells, "names": names, "cell_timeout": limits.cell_timeout,
           "call_timeout": limits.call_timeout, "memory_mb": limits.memory_mb, "file_mb": limits.file_mb,
           "threads": limits.threads, "cpu_seconds": int(limits.timeout * limits.threads) + 60}
    try:
        proc = subprocess.Popen([sys.executable, *flags, "-B", "-m", "course_lib.grading_worker", str(job_r), str(out_w)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=scratch,
                                env=_worker_env(scratch, limits.threads), pass_fds=(job_r, out_w),
                                start_new_session=True)
    finally:
        os.close(job_r)
        os.close(out_w)
        log.close()
    with _ACTIVE_LOCK:
        _ACTIVE.add(proc)
    chan, step = _Channel(out_r), min(deadline, time.monotonic() + SETUP_SECONDS)
    sent = {i for i, _ in cells}  # messages about anything else are ignored: a forged flood cannot grow our state
    att.running = ("setup",)
    try:
        _send(job_w, encode(job), step)
        while True:
            msg = chan.recv(min(deadline, step))
            kind = msg["kind"]
            if kind == "ready":
                att.layers = tuple(str(x)[:100] for x in list(msg.get("layers", ()))[:5])
            elif kind == "cell" and int(msg["index"]) in sent:
                att.running = ("cell", int(msg["index"]))
                step = time.monotonic() + limits.cell_timeout + limits.grace
            elif kind == "cell_done" and int(msg["index"]) in sent:
                att.cells[int(msg["index"])] = (str(msg["status"])[:20], str(msg["message"])[:300])
            elif kind == "defined":
                att.defined = {k: v for k, v in msg["names"].items() if k in names and isinstance(v, dict)}
                att.running = ("inputs",)
                step = time.monotonic() + SETUP_SECONDS
                _send(job_w, encode(make_inputs(att.defined)), step)
            elif kind == "call" and msg["name"] in names:
                att.running = ("call", msg["name"])
                step = time.monotonic() + limits.call_timeout * 5 + limits.grace
            elif kind == "result" and msg["name"] in names:
                att.results[msg["name"]] = msg
            elif kind == "done":
                att.running = None
                break
    except TimeoutError:
        att.ended = "timeout"
    except (EOFError, BrokenPipeError):
        att.ended = "crashed"
    except (_Broken, KeyError, TypeError, ValueError, AttributeError) as e:
        att.ended, att.detail = "broken", f"the submission corrupted the grader's channel ({e})"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started in its session
        except ProcessLookupError:
            pass
        code = proc.wait()
        with _ACTIVE_LOCK:
            _ACTIVE.discard(proc)
        os.close(out_r)
        os.close(job_w)
        if att.ended == "crashed":
            att.detail = _crash_detail(code, os.path.join(scratch, "output.log"))
        shutil.rmtree(scratch, ignore_errors=True)
    return att


def _crash_detail(code: int, log_path: str) -> str:
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 4000))
            tail = f.read().decode("utf-8", "replace")
        last = [ln.strip() for ln in tail.splitlines() if "Error" in ln or "error" in ln]
        return how + (f"; last error printed: {last[-1][:150]}" if last else "")
    except OSError:
        return how


# ---- verdicts ------------------------------------------------------------------------------------


def _verdict(sub: str, ex, inputs: list[dict], result: dict, limits: Limits) -> dict:
    """The row for one exercise from the worker's raw outputs, judged against the reference here."""
    outputs = result.get("outputs")
    if not isinstance(outputs, list) or not outputs or len(outputs) > len(inputs):
        return _row(sub, ex.name, "error", "the grader received no usable outputs for this function", 0, ex.points)
    for trial, (kw, got) in enumerate(zip(inputs, outputs)):
        if isinstance(got, dict) and got.get("timeout"):
            return _row(sub, ex.name, "timeout", f"your function did not return within {limits.call_timeout:g} s "
                        f"on random test {trial + 1}.", 0, ex.points)
        if isinstance(got, dict):
            got = Raised(str(got.get("error", ""))[:100], str(got.get("message", ""))[:300])
        elif not isinstance(got, torch.Tensor):
            return _row(sub, ex.name, "error", f"the grader received a {type(got).__name__}, not an output", 0, ex.points)
        verdict = judge(ex, kw, ex.reference(**exercises._clone(kw)), got, trial)
        if verdict is not None:
            message = verdict.message + (f" Hint: {verdict.hint}" if verdict.hint else "")
            return _row(sub, ex.name, verdict.status, message, 0, ex.points)
    if len(outputs) < len(inputs):
        return _row(sub, ex.name, "error", "the grader received outputs for only some tests", 0, ex.points)
    library = [str(x) for x in result.get("library") or []]
    if library:
        return _row(sub, ex.name, "failed", f"matches the reference, but by calling {', '.join(library)} from course_lib "
                    "instead of its own code: 0 points, flagged for review.", 0, ex.points, "library_reference")
    if result.get("tampered"):
        return _row(sub, ex.name, "passed", "matches the reference on fresh random inputs; the function switched off "
                    "the grader's call tracing (flagged for review).", ex.points, ex.points, "tampered")
    return _row(sub, ex.name, "passed", f"matches the reference on {len(inputs)} fresh random inputs.", ex.points, ex.points)


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
        return _row(sub, ex.name, "failed", f"`{ex.name}` is not a function (it is of type {info.get('type', 'unknown')}).", 0, ex.points)
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


def grade_notebook(path, name: str | None = None, limits: Limits = Limits(), scratch_base=None,
                   seed: int | None = None) -> dict:
    """Grade one submission; returns {submission, sha256, lesson, rows, seconds, notes, sandbox}."""
    start = time.monotonic()
    path = Path(path)
    sub = name or str(path)
    record = {"submission": sub, "sha256": "", "lesson": None, "rows": [], "seconds": 0.0, "notes": [], "sandbox": []}
    try:
        data = path.read_bytes()
        record["sha256"] = hashlib.sha256(data).hexdigest()
        cells, metadata = read_cells(data)
        problem = None
    except (OSError, ValueError) as e:
        cells, metadata, problem = [], {}, str(e)
    lesson = lesson_of(cells, metadata, path.name)
    record["lesson"] = lesson
    expected = [ex for ex in EXERCISES.values() if ex.lesson == lesson]
    if problem or lesson is None:
        message = problem or "could not tell which lesson this notebook is (no exercise names, no NN_ file prefix)."
        record["rows"] = ([_row(sub, ex.name, "error", message, 0, ex.points) for ex in expected]
                          or [_row(sub, WHOLE_NOTEBOOK, "error", message)])
        record["seconds"] = round(time.monotonic() - start, 2)
        return record
    names = [ex.name for ex in expected]
    where = definitions(cells, names)
    inputs = {ex.name: exercises.fresh_inputs(ex, None if seed is None else seed + i)  # None: a secret seed
              for i, ex in enumerate(expected)}
    rows: dict[str, dict] = {}
    skipped: dict[int, str] = {}
    deadline = start + limits.timeout
    att = None
    for _ in range(limits.attempts):
        todo = [n for n in names if n not in rows]
        if not todo or time.monotonic() >= deadline:
            break
        att = _run_worker([(i, s) for i, s in cells if i not in skipped], todo,
                          lambda defined: {n: inputs[n] for n in todo if (defined.get(n) or {}).get("callable")},
                          limits, deadline, scratch_base)
        record["sandbox"] = list(att.layers)
        for n, result in att.results.items():
            if n in todo:
                rows[n] = _verdict(sub, EXERCISES[n], inputs[n], result, limits)
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
            rows[n] = (_row(sub, n, "timeout", f"your function did not return within {limits.call_timeout:g} s and "
                            "ignored the alarm.", 0, ex.points) if att.ended == "timeout" else
                       _row(sub, n, "failed", "calling your function ended the grading process "
                            f"({att.detail or att.ended}).", 0, ex.points))
        elif kind != "inputs":
            break  # it died before running any cell, or broke the channel: running it again would not help
    out_of_time = time.monotonic() >= deadline and (att is None or att.ended != "done")
    if att is not None:
        record["notes"] += [f"cell {c} {'timed out' if s == 'timeout' else 'raised ' + m}"
                            for c, (s, m) in sorted(att.cells.items()) if s != "ok"]
    for ex in expected:
        if ex.name not in rows:
            rows[ex.name] = _missing_row(sub, ex, where, att, skipped, out_of_time)
        row = rows[ex.name]
        dup = where.get(ex.name, [])
        if len(dup) > 1:
            row["message"] += f" (`{ex.name}` is defined in cells {', '.join(map(str, dup))}; the last one ran counts.)"
        if skipped and row["status"] != "not_attempted":
            row["message"] += " Graded with " + "; ".join(f"cell {c} skipped ({r})" for c, r in skipped.items()) + "."
    record["rows"] = [rows[n] for n in names]
    record["seconds"] = round(time.monotonic() - start, 2)
    return record


def _grade_safely(path, name, limits, scratch_base) -> dict:
    """grade_notebook, with a failure of the grader itself (e.g. no process could start) as error rows."""
    try:
        return grade_notebook(path, name, limits, scratch_base)
    except Exception as e:
        try:
            sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            sha = ""
        message = f"the grader failed on this submission ({type(e).__name__}: {e})"
        return {"submission": name, "sha256": sha, "lesson": None, "rows": [_row(name, WHOLE_NOTEBOOK, "error", message)],
                "seconds": 0.0, "notes": [message], "sandbox": [], "retry": True}


# ---- a batch -------------------------------------------------------------------------------------


def find_submissions(paths) -> list[tuple[str, Path]]:
    """(name, path) of every notebook named or found under the given folders (checkpoints skipped), in order."""
    found, seen = [], set()
    for p in map(Path, paths):
        if p.is_dir():
            items = [(str(p / q.relative_to(p)), q) for q in sorted(p.rglob("*.ipynb"))
                     if ".ipynb_checkpoints" not in q.parts]
        elif p.exists():
            items = [(str(p), p)]
        else:
            raise ValueError(f"{p} does not exist (give notebook files or folders of them)")
        for label, q in items:
            if q.resolve() not in seen:
                seen.add(q.resolve())
                found.append((label, q))
    if not found:
        raise ValueError("no notebooks (*.ipynb) found in " + ", ".join(map(str, paths)))
    return found


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
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interruption: that submission is graded again
    return done


def _spreadsheet_safe(value):
    """A text cell a spreadsheet would run as a formula (=, +, -, @ first) gets a leading apostrophe (OWASP)."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _csv_text(rows) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _spreadsheet_safe(v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def summarize(records) -> dict:
    """Totals over submissions: points, and how many rows have each status."""
    rows = [r for rec in records for r in rec["rows"]]
    return {"submissions": len(records), "points": sum(r["points"] for r in rows),
            "max_points": sum(r["max_points"] for r in rows),
            "status": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
            "flagged": sum(bool(r["flag"]) for r in rows),
            "ungradable": sorted({rec["submission"] for rec in records if any(r["status"] == "error" for r in rec["rows"])})}


def grade_batch(paths, out, json_out=None, limits: Limits | None = None, jobs: int = 1, force: bool = False,
                scratch_base=None, echo=print) -> tuple[list[dict], dict]:
    """Grade every submission (resuming from the journal), write the CSV (and JSON); return (records, totals)."""
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    limits = limits or Limits(threads=max(1, (os.cpu_count() or 1) // jobs))
    subs = find_submissions(paths)
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
    keyed = []
    for label, p in subs:
        try:
            sha = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError:
            sha = ""
        keyed.append((label, p, sha))
    todo = [(label, p) for label, p, sha in keyed if (label, sha) not in done or not sha]
    echo(f"{len(subs)} submission(s): {len(subs) - len(todo)} already graded in {journal}, {len(todo)} to grade "
         f"with {jobs} job(s)")
    lock = threading.Lock()
    with open(journal, "a", encoding="utf-8") as jf, ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_grade_safely, p, label, limits, scratch_base): label for label, p in todo}
        try:
            for k, fut in enumerate(as_completed(futures), 1):
                rec = fut.result()
                with lock:
                    jf.write(json.dumps(rec) + "\n")
                    jf.flush()
                    os.fsync(jf.fileno())
                    done[(rec["submission"], rec["sha256"])] = rec
                got = sum(r["points"] for r in rec["rows"])
                most = sum(r["max_points"] for r in rec["rows"])
                counts = ", ".join(f"{sum(r['status'] == s for r in rec['rows'])} {s}" for s in STATUSES
                                   if any(r["status"] == s for r in rec["rows"]))
                echo(f"[{k}/{len(todo)}] {rec['submission']}: {got}/{most} points ({counts}) in {rec['seconds']:.1f} s")
        except BaseException:
            for f in futures:
                f.cancel()
            with _ACTIVE_LOCK:
                for proc in list(_ACTIVE):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            raise
    records = [done[(label, sha)] for label, _, sha in keyed if (label, sha) in done]
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
    records, totals = grade_batch(args.submissions, args.out, args.json, limits, args.jobs, args.force, args.scratch)
    s = totals["status"]
    print(f"Graded {totals['submissions']} submission(s) in {time.monotonic() - start:.0f} s: "
          f"{totals['points']}/{totals['max_points']} points; " + ", ".join(f"{v} {k}" for k, v in s.items() if v)
          + (f"; {totals['flagged']} flagged for review" if totals["flagged"] else ""))
    print(f"Wrote {args.out}" + (f" and {args.json}" if args.json else ""))
    if totals["ungradable"]:
        print(f"{len(totals['ungradable'])} submission(s) could not be graded in full (status error): "
              + ", ".join(totals["ungradable"][:10]) + (" ..." if len(totals["ungradable"]) > 10 else ""))
        return 1
    return 0
