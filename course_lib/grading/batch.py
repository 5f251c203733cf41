"""Batch grading of untrusted notebooks: each runs confined in its own process; every verdict is made here.

`python -m course_lib grade SUBMISSION... --out grades.csv [--json results.json] [--jobs N] [--shard K/N]`. For each
notebook this process reads the file within fixed limits (through course_lib.grading.reader, in a small process of
its own), reads its source (course_lib.grading.scan) and draws the exercises' inputs and tasks from a secret seed. A
worker process (course_lib.grading.worker, confined by course_lib.grading.sandbox) runs the code cells in quick mode,
then calls the learner's functions on those inputs; the oracles of a behaviour task (an exact denoiser, a model)
stay here and answer the worker's requests (course_lib.grading.session). The worker only runs code: what it returns
is judged here against the references (course_lib.exercises), and nothing it says is trusted. Every failure of one
submission becomes that submission's `error` row; the CSV and JSON are always written. A journal next to the CSV
records each graded submission, so an interrupted batch resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from .. import exercises
from ..checkpoints import write_json_atomic, write_text_atomic
from ..exercises import EXERCISES, LIBRARY_EQUIVALENTS, Raised, judge, judge_task
from . import scan, shards
from .calls import clone_inputs
from .names import top_level_bindings
from .processes import Reaper, kill_all
from .reader import MAX_CELLS, MAX_CODE_BYTES, MAX_NOTEBOOK_BYTES, read_cells  # noqa: F401  (the limits, re-exported)
from .results import (  # noqa: F401  (COLUMNS, FLAGS: re-exported by course_lib.grading)
    COLUMNS,
    FLAGS,
    MAX_MESSAGE_TEXT,
    STATUSES,
    csv_text,
    make_row,
    summarize,
)
from .session import Attempt, Call, clean, course_root, data_dir, read_notebook, run_worker

WHOLE_NOTEBOOK = "(notebook)"  # the exercise column of the one row of a submission whose lesson is unknown
MAX_NOTES = 20  # notes per submission in the JSON (each at most MAX_MESSAGE_TEXT characters)
MAX_FINDINGS = 30  # reasons kept per flagged row
# sandbox refusals no honest notebook triggers: reading what is protected, the references, signalling others
TAMPER_REFUSALS = ("read", "tamper", "signal")


@dataclass(frozen=True)
class Limits:
    """Per-submission limits: `timeout` covers the whole submission, every attempt included."""

    timeout: float = 600.0
    cell_timeout: float = 120.0
    call_timeout: float = 20.0
    memory_mb: int = 6144  # address space of the worker (torch alone maps about 1.5 GB)
    file_mb: int = 256
    attempts: int = 3  # a cell that kills the process is skipped and the notebook run again
    grace: float = 10.0  # beyond a cell's or a call's own alarm before the process is killed
    landlock: bool = True  # kernel layers, where the platform has them (off only to test the fallbacks)
    seccomp: bool = True

    def __post_init__(self):
        for name in ("timeout", "cell_timeout", "call_timeout", "memory_mb", "file_mb", "attempts", "grace"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and value != float("inf")):
                raise ValueError(f"{name} must be a positive finite number, got {value}")


# ---- text that is safe to print, write and show ----------------------------------------------------

def display_path(path) -> str:
    """A path as printable text: bytes that are not UTF-8 (a name from an unzipped archive) become \\xNN."""
    raw = os.fsencode(path)
    return clean(raw.decode("utf-8", "backslashreplace"), 1000)


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


def open_submission(path: str) -> int:
    """A read-only descriptor of a regular file of at most MAX_NOTEBOOK_BYTES (opened without blocking or following
    a link); ValueError or OSError otherwise."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"is {_kind(st.st_mode)}, not a notebook file")
        if st.st_size > MAX_NOTEBOOK_BYTES:
            raise ValueError(f"the file is {st.st_size >> 20} MB, over the {MAX_NOTEBOOK_BYTES >> 20} MB limit")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _digest(fd: int) -> str:
    """The SHA-256 of an open file, read in 1 MB pieces (the file is never held in memory)."""
    h, size = hashlib.sha256(), 0
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        size += len(chunk)
        if size > MAX_NOTEBOOK_BYTES:
            raise ValueError(f"the file is over the {MAX_NOTEBOOK_BYTES >> 20} MB limit")
        h.update(chunk)
    os.lseek(fd, 0, os.SEEK_SET)
    return h.hexdigest()


def read_submission(path: str) -> tuple[str, list, dict]:
    """(SHA-256, code cells, metadata) of a submission, read within the limits (see course_lib.grading.reader)."""
    fd = open_submission(path)
    try:
        sha = _digest(fd)
        cells, metadata = read_notebook(fd)
    finally:
        os.close(fd)
    return sha, cells, metadata


def _sha(sub) -> str:
    if not sub.path:
        return ""
    try:
        fd = open_submission(sub.path)
    except (OSError, ValueError):
        return ""
    try:
        return _digest(fd)
    except (OSError, ValueError):
        return ""
    finally:
        os.close(fd)


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


# ---- what the course itself provides ----------------------------------------------------------------



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

    root = course_root() / "notebooks"
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


def definitions(cells, names) -> dict[str, list[int]]:
    """For each name, the cells that bind it at top level (def, class, assignment or import)."""
    import ast

    where: dict[str, list[int]] = {n: [] for n in names}
    wanted = set(names)
    for index, source in cells:
        try:
            bound = {name for name, _, _ in top_level_bindings(ast.parse(scan.as_python(source)[0]))}
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            bound = set(_DEF_LINE.findall(source))
        for n in sorted(bound & wanted):
            where[n].append(index)
    return where


# ---- verdicts ------------------------------------------------------------------------------------------

def call_seconds(limits: Limits, name: str) -> float:
    """The time limit for one call of exercise `name`: --call-timeout, or more for an exercise that trains."""
    ex = EXERCISES.get(name)
    return max(limits.call_timeout, ex.seconds or 0.0) if ex is not None else limits.call_timeout


def _draw(ex, limits: Limits, seed: int | None):
    """(what the judge keeps, the worker's calls) for one exercise: input dicts for a value exercise, tasks (with
    their oracles and private data) for one graded on behaviour; from a secret seed unless `seed` is given."""
    seconds = call_seconds(limits, ex.name)
    if ex.on_behaviour:
        tasks = exercises.fresh_tasks(ex, seed)
        return tasks, [Call(c.inputs, c.procedure, c.oracles, seconds) for t in tasks for c in t.calls]
    inputs = exercises.fresh_inputs(ex, seed)
    return inputs, [Call(clone_inputs(kw), None, {}, seconds) for kw in inputs]


def _as_result(out):
    """A validated worker output as the judge takes it: a tensor, a procedure's dict of tensors, or a Raised."""
    if isinstance(out, dict) and "tensors" in out:
        return out["tensors"]
    if isinstance(out, dict):
        return Raised(out["error"], out["message"])
    return out


def judge_outputs(sub: str, ex, drawn, outputs: list, limits: Limits) -> dict:
    """The row for one exercise from the worker's outputs, judged here against the reference or by the task's
    assessment (with the oracles' own logs)."""
    timeout = next((k for k, o in enumerate(outputs) if isinstance(o, dict) and o.get("timeout")), None)
    if timeout is not None:
        return make_row(sub, ex.name, "timeout", f"your function did not return within {call_seconds(limits, ex.name):g} s "
                    f"on call {timeout + 1}.", 0, ex.points)
    got = [_as_result(o) for o in outputs]
    try:
        if ex.on_behaviour:
            verdict, k = None, 0
            for task in drawn:
                part = got[k: k + len(task.calls)]
                k += len(task.calls)
                if len(part) < len(task.calls):
                    return make_row(sub, ex.name, "error", "the grader received results for only some calls", 0, ex.points)
                verdict = judge_task(ex, task, part)
                if verdict is not None:
                    break
        else:
            if len(got) < len(drawn):
                return make_row(sub, ex.name, "error", "the grader received results for only some calls", 0, ex.points)
            verdict = next((v for trial, (kw, g) in enumerate(zip(drawn, got))
                            if (v := judge(ex, kw, exercises.reference_output(ex, kw), g, trial)) is not None), None)
    except Exception as e:  # judging a behaviour exercise runs library code on the learner's weights
        return make_row(sub, ex.name, "error", f"the grader could not assess the result ({type(e).__name__}: "
                    f"{clean(str(e), 120)})", 0, ex.points)
    if verdict is not None:
        message = verdict.message + (f" Hint: {verdict.hint}" if verdict.hint else "")
        return make_row(sub, ex.name, verdict.status, message, 0, ex.points)
    return make_row(sub, ex.name, "passed", exercises.passed(ex).message, ex.points, ex.points)


def _flag(row: dict, flag: str, why: list[str], record: dict | None = None) -> None:
    """Flag a row for review, saying why: `library_reference` and `tampered` zero it (evidence that cannot come from
    honest code), `review` keeps its points. Every reason goes into the record's `findings`."""
    if record is not None:
        record.setdefault("findings", {}).setdefault(row["exercise"], [])
        kept = record["findings"][row["exercise"]]
        kept += [clean(w, 200) for w in why if clean(w, 200) not in kept][: MAX_FINDINGS - len(kept)]
    if FLAGS.index(flag) > FLAGS.index(row["flag"]) if row["flag"] else False:
        return  # a heavier flag is already there
    reasons = "; ".join(why[:2]) + (f"; and {len(why) - 2} more (see the JSON)" if len(why) > 2 else "")
    row["flag"] = flag
    if flag == "review":
        row["message"] = clean(f"{row['message']} Flagged for review: {reasons}.")
        return
    if row["status"] == "passed":
        row["status"] = "failed"
        text = (f"matches the reference, but {reasons}: 0 points, flagged for review." if flag == "library_reference"
                else f"matches the reference, but the notebook {reasons}: 0 points, flagged for review.")
        row["message"] = clean(text)
    else:  # the reason first: the judged message and its hint may be cut at the length limit
        row["message"] = clean(f"Flagged for review: {reasons}. {row['message']}")
    row["points"] = 0


def _refuse(row: dict, ex, why: list[str]) -> None:
    """Fail a row whose function uses a library the exercise refuses (its rule, said in the exercise)."""
    if row["status"] == "not_attempted":
        return
    row["status"], row["points"] = "failed", 0
    row["message"] = clean(f"Your function {why[0]}, which this exercise does not allow. {ex.rule}")


def _cell_reason(att: Attempt) -> str:
    if att.ended == "timeout":
        return "it ran past the time limit and ignored the alarm"
    if att.ended == "broken":
        return att.detail
    return "it ended the grading process (" + (att.detail or "no reason given") + ")"


def _missing_row(sub, ex, where, att: Attempt | None, skipped: dict, out_of_time: bool) -> dict:
    """The row for an exercise that got no outputs: never defined, defined by a failing cell, or out of time."""
    cells = where.get(ex.name, [])
    info = (att.defined.get(ex.name) if att else None) or {}
    if out_of_time:
        return make_row(sub, ex.name, "timeout", "the notebook used up its time limit before this exercise was graded.",
                    0, ex.points)
    if info.get("defined") and not info.get("callable"):
        return make_row(sub, ex.name, "failed", f"`{ex.name}` is not a function (it is of type {info.get('type') or '?'}).",
                    0, ex.points)
    if not cells:
        return make_row(sub, ex.name, "not_attempted", f"no cell defines `{ex.name}` (was its cell deleted?).", 0, ex.points)
    status, why = "failed", []
    for c in cells:
        if c in skipped:
            why.append(f"cell {c} was skipped: {skipped[c]}")
        elif att and c in att.cells and att.cells[c][0] != "ok":
            s, m = att.cells[c]
            status = "timeout" if s == "timeout" else status
            why.append(f"cell {c} " + ("timed out" if s == "timeout" else f"raised {m}"))
    if att is None or att.ended != "done" and not why:
        return make_row(sub, ex.name, "error", "the grading process ended before this exercise was graded"
                    + (f" ({att.detail})" if att and att.detail else "") + ".", 0, ex.points)
    return make_row(sub, ex.name, status, f"`{ex.name}` was not defined when the notebook finished"
                + (": " + "; ".join(why) if why else "") + ".", 0, ex.points)


def _error_record(sub: Submission, message: str, sha: str = "", lesson=None, retry: bool = False) -> dict:
    expected = [ex for ex in EXERCISES.values() if ex.lesson == lesson] if lesson is not None else []
    rows = [make_row(sub.label, ex.name, "error", message, 0, ex.points) for ex in expected] or [
        make_row(sub.label, WHOLE_NOTEBOOK, "error", message)]
    return {"submission": sub.label, "sha256": sha, "lesson": lesson, "rows": rows, "seconds": 0.0,
            "notes": [clean(message)], "refused": [], "sandbox": [], **({"retry": True} if retry else {})}


def _protected(policy: dict) -> list[str]:
    """What no worker may read: the course's notebooks (solutions), the exercise references (the whole package, its
    bytecode cache included), the submissions, the output folder with its journal, the other workers' scratch."""
    root = course_root()
    return [str(root / "notebooks"), str(Path(exercises.__file__).resolve().parent), *policy.get("deny", [])]


def grade_notebook(path, name: str | None = None, limits: Limits = Limits(), scratch_base=None,
                   seed: int | None = None, policy: dict | None = None) -> dict:
    """Grade one submission; returns {submission, sha256, lesson, rows, seconds, notes, refused, sandbox, findings}.
    `seed` fixes the inputs and tasks (tests); by default they are drawn from a secret one."""
    sub = path if isinstance(path, Submission) else Submission(name or display_path(path), os.fspath(path))
    policy = dict(policy or {})
    policy["protected"] = _protected(policy)
    start = time.monotonic()
    by_name = lesson_of([], {}, sub.label)
    if sub.problem:
        return _error_record(sub, f"{sub.label} {sub.problem}", lesson=by_name)
    try:
        sha, cells, metadata = read_submission(sub.path)
    except (OSError, ValueError) as e:
        return _error_record(sub, f"{sub.label} cannot be read: {clean(getattr(e, 'strerror', None) or str(e), 150)}",
                             _sha(sub), by_name)
    lesson = lesson_of(cells, metadata, sub.label)
    if lesson is None:
        return _error_record(sub, f"{sub.label}: could not tell which lesson this notebook is (no exercise names, "
                                  "no NN_ file prefix).", sha)
    record = {"submission": sub.label, "sha256": sha, "lesson": lesson, "rows": [], "seconds": 0.0, "notes": [],
              "refused": [], "sandbox": []}
    expected = [ex for ex in EXERCISES.values() if ex.lesson == lesson]
    names = [ex.name for ex in expected]
    where = definitions(cells, names)
    tamper, found = scan.scan(cells, released_sources(lesson, policy.get("released")),
                              {n: scan.Rule(frozenset(LIBRARY_EQUIVALENTS.get(n, ())), EXERCISES[n].refused)
                               for n in names},
                              {ex.reference.__name__ for ex in EXERCISES.values()})
    rows: dict[str, dict] = {}
    skipped: dict[int, str] = {}
    deadline = start + limits.timeout
    att = None
    refused: list = []
    drawn: dict = {}

    def make_calls(defined: dict) -> dict:
        todo = [n for n in names if n not in rows and (defined.get(n) or {}).get("callable")]
        calls = {}
        for i, n in enumerate(todo):  # fresh on every attempt: a call's oracles count from zero
            drawn[n], calls[n] = _draw(EXERCISES[n], limits, None if seed is None else seed + i)
        return calls

    broken = False
    for _ in range(limits.attempts):
        todo = [n for n in names if n not in rows]
        if att is not None and att.defined:  # only what was a function last time can still be graded
            todo = [n for n in todo if att.defined.get(n, {}).get("callable")]
        if not todo or time.monotonic() >= deadline:
            break
        att = run_worker([(i, s) for i, s in cells if i not in skipped], todo, make_calls, limits, deadline,
                         scratch_base, policy)
        refused += att.refused
        broken |= att.ended == "broken"
        record["sandbox"] = list(att.layers)
        for n, outs in att.outputs.items():
            complete = len(outs) == sum(len(t.calls) for t in drawn[n]) if EXERCISES[n].on_behaviour \
                else len(outs) == len(drawn[n])
            if n in todo and (complete or any(isinstance(o, dict) and o.get("timeout") for o in outs)):
                rows[n] = judge_outputs(sub.label, EXERCISES[n], drawn[n], outs, limits)
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
            rows[n] = (make_row(sub.label, n, "timeout", f"your function did not return within {call_seconds(limits, n):g} s "
                            "and ignored the alarm.", 0, ex.points) if att.ended == "timeout" else
                       make_row(sub.label, n, "failed", "calling your function ended the grading process "
                            f"({att.detail or att.ended}).", 0, ex.points))
        elif kind not in ("calls", "inputs"):
            break  # it died before running any cell, or broke the channel: running it again would not help
    out_of_time = time.monotonic() >= deadline and (att is None or att.ended != "done")
    if att is not None:
        record["notes"] += [f"cell {c} {'timed out' if s == 'timeout' else 'raised ' + m}"
                            for c, (s, m) in sorted(att.cells.items()) if s != "ok"]
    refused = list(dict.fromkeys(refused))
    record["refused"] = [f"{what} ({kind})" for kind, what in refused[:20] if kind != "library"]
    record["notes"] += [f"{what} while graded" for kind, what in refused[:5] if kind == "library"]
    tampered = [f"tried {what}" for kind, what in refused if kind in TAMPER_REFUSALS]
    if broken:
        tampered.append("corrupted the grader's channel")
    for ex in expected:
        if ex.name not in rows:
            rows[ex.name] = _missing_row(sub.label, ex, where, att, skipped, out_of_time)
        row = rows[ex.name]
        dup = where.get(ex.name, [])
        if len(dup) > 1:
            row["message"] = clean(row["message"] + f" (`{ex.name}` is defined in cells {', '.join(map(str, dup[:8]))}; "
                                   "the last one ran counts.)")
        if skipped and row["status"] != "not_attempted":
            row["message"] = clean(row["message"] + " Graded with " + "; ".join(
                f"cell {c} skipped ({r})" for c, r in list(skipped.items())[:3]) + ".")
        findings = found.get(ex.name, [])
        if ex.evidence is not None and ex.name in drawn and row["status"] == "passed":
            findings = findings + [scan.Finding("review", why, 0) for task in drawn[ex.name]
                                   for why in ex.evidence(task)]
        refusals = [str(f) for f in findings if f.kind == "refused"]
        if refusals:
            _refuse(row, ex, refusals)
        if row["status"] == "not_attempted":
            continue
        for kind, flag in (("copy", "library_reference"), ("review", "review")):
            why = [str(f) for f in findings if f.kind == kind]
            if why:
                _flag(row, flag, why, record)
        if tamper:
            _flag(row, "review", [f"the notebook {f}" for f in tamper], record)
        if tampered:
            _flag(row, "tampered", tampered, record)
    record["rows"] = [rows[n] for n in names]
    record["notes"] = [clean(n) for n in record["notes"][:MAX_NOTES]]
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
    keep = [str(course_root()), *filter(None, [data_dir()]), sys.prefix]
    deny = {str(base)} | {os.path.realpath(s.path) for s in subs if s.path}
    deny |= {os.path.realpath(os.fspath(p)) for p in outputs if p}
    for p in map(os.fspath, paths):
        real = os.path.realpath(p)
        if not any(_within(k, real) for k in keep):
            deny.add(real)
    return sorted(deny)


def grade_batch(paths, out, json_out=None, limits: Limits | None = None, jobs: int = 1, force: bool = False,
                scratch_base=None, echo=print, follow_symlinks: bool = False, released=None,
                shard: tuple[int, int] | None = None) -> tuple[list[dict], dict]:
    """Grade every submission (resuming from the journal), write the CSV (and JSON); return (records, totals). With
    `shard` (K, N) only the submissions of shard K of N are graded, and a manifest for `merge-grades` is written."""
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if os.name != "posix":
        raise ValueError("the grader confines submissions with POSIX features: run it on Linux or macOS "
                         "(on Windows, inside WSL or the container described in docs/grading.md)")
    limits = limits or Limits()
    subs = find_submissions(paths, follow_symlinks)
    all_labels = [s.label for s in subs]
    if shard is not None:
        subs = [s for s in subs if shards.shard_of(s.label, shard[1]) == shard[0]]
    out = Path(out)
    journal = journal_path(out)
    plan = _output_plan(subs, out, journal, json_out)
    for target in filter(None, [out, json_out and Path(json_out)]):
        if target.exists() and not journal.exists() and not force:
            raise ValueError(f"{target} exists and is not from an earlier grading run (no {journal.name} next to it); "
                             "pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.claim()  # one grading run per CSV at a time: a second one would interleave the journal
    try:
        return _grade_claimed(subs, out, journal, json_out, limits, jobs, force, scratch_base, echo, paths, released,
                              shard, all_labels)
    finally:
        plan.release()


def _output_plan(subs, out: Path, journal: Path, json_out):
    """Refuse outputs that would overwrite a submission or each other (existing outputs are handled by the journal)."""
    from ..outputs import Plan

    plan = Plan(force=True)
    for sub in subs:
        if sub.path:
            plan.input(sub.path, f"submission {sub.label}")
    plan.output(out, "grades CSV (--out)", may_exist=True)
    plan.output(journal, "journal kept next to --out", may_exist=True)
    if json_out:
        plan.output(json_out, "JSON (--json)", may_exist=True)
    return plan


def _grade_claimed(subs, out, journal, json_out, limits, jobs, force, scratch_base, echo, paths, released, shard,
                   all_labels):
    if force and journal.exists():
        journal.unlink()
    done = _read_journal(journal)
    keyed = [(sub, _sha(sub)) for sub in subs]
    todo = [sub for sub, sha in keyed if (sub.label, sha) not in done or not sha]
    say = lambda text: _say(echo, text)  # noqa: E731  (labels may hold anything a file name can)
    where = f" (shard {shard[0]}/{shard[1]} of {len(all_labels)})" if shard else ""
    say(f"{len(subs)} submission(s){where}: {len(subs) - len(todo)} already graded in {display_path(journal)}, "
        f"{len(todo)} to grade with {jobs} job(s)")
    base = Path(tempfile.mkdtemp(prefix="course-grade-batch-", dir=scratch_base))  # 0700: workers see only their own
    policy = {"deny": _deny_list(paths, subs, [out, journal, json_out], base), "released": released}
    reaper = Reaper()
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
                kill_all()
                raise
    finally:
        reaper.close()
        shutil.rmtree(base, ignore_errors=True)
        records = [done[(sub.label, sha)] for sub, sha in keyed if (sub.label, sha) in done]
        totals = summarize(records)
        write_text_atomic(csv_text([r for rec in records for r in rec["rows"]]), out)
        if json_out:
            write_json_atomic({"totals": totals, "submissions": records}, json_out)
        if shard is not None:
            graded = {rec["submission"] for rec in records if not rec.get("retry")}
            shards.write_manifest(out, shard[0], shard[1], all_labels, [s.label for s in subs], graded,
                                  Path(json_out).resolve() if json_out else None)
    return records, totals


def main_grade(args) -> int:
    """The `grade` command: exit 0 when every submission was graded, 1 when some could not be."""
    limits = Limits(timeout=args.timeout, cell_timeout=min(args.cell_timeout, args.timeout),
                    call_timeout=args.call_timeout, memory_mb=args.memory_mb)
    shard = shards.parse_shard(args.shard) if args.shard else None
    start = time.monotonic()
    records, totals = grade_batch(args.submissions, args.out, args.json, limits, args.jobs, args.force, args.scratch,
                                  follow_symlinks=args.follow_symlinks, released=args.released, shard=shard)
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
