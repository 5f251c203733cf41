"""The batch grader: hostile submissions cannot break the batch, earn an unflagged point by copying or skipping the
algorithm, forge a grade, outlive their grading, reach the network or read what is not theirs; the grader stays small
and linear on inputs built to blow it up; shards merge only when complete. (Honest submissions in every style get full
marks with no flag: tests/test_grading_honest.py.)"""
import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
import torch

from course_lib import grading
from course_lib.grading import Limits, channel, definitions, grade_batch, lesson_of, read_cells, reader, scan
from course_lib.grading import batch as B

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
FAST = Limits(timeout=150, cell_timeout=6, call_timeout=4, grace=10, memory_mb=3072)  # generous: a busy machine
MARKER = "course-grader-test-escapee"  # in the command line of every process a hostile submission starts

IMPORTS = "import os, sys, signal, shutil, torch\nfrom course_lib import check, progress"
GOOD0 = "def noise_images(x, sigma, noise):\n    return x + sigma.view(-1, *[1] * (x.ndim - 1)) * noise"
WRONG0 = "def noise_images(x, sigma, noise):\n    return x + sigma.mean() * noise"
CHECK0 = 'check("noise_images", noise_images)'
GOOD1 = ["def alpha_bar_from_betas(betas):\n    return torch.cumprod(1 - betas, 0)",
         "def q_sample(x0, t, alpha_bar, noise):\n    ab = alpha_bar[t].view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)\n"
         "    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise",
         "def log_snr(alpha_bar):\n    return torch.log(alpha_bar / (1 - alpha_bar))"]
LIB = "from course_lib import schedules"
EULER = ("def sample_loop(denoise, x, sigmas):\n    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):\n"
         "        d = denoise(x, s)\n        x = d if s_next == 0 else x + (s_next - s) * (x - d) / s\n    return x")
SPAWN = ("import _posixsubprocess\n"  # a setsid child started without any audit event
         "exe = os.fsencode(sys.executable)\n"
         "_posixsubprocess.fork_exec([exe, b'-c', b'import time; time.sleep(600)', b'{marker}'], [exe], True, (), "
         "None, None, -1, -1, -1, -1, -1, -1, *os.pipe(), False, True, -1, None, None, None, -1, None, False)"
         ).format(marker=MARKER)


def _notebook(path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A submission")] + [nbformat.v4.new_code_cell(c) for c in cells]
    with open(path, "w", encoding="utf-8") as f:
        nbformat.write(nb, f)
    return Path(os.fsdecode(path))


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _rows(csv_path: Path) -> dict:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return {(r["submission"].rsplit(os.sep, 1)[-1], r["exercise"]): r for r in csv.DictReader(f)}


def _escapees() -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if MARKER.encode() in cmdline and b"pytest" not in cmdline:
                found.append(entry)
    return found


# ---- reading submissions ---------------------------------------------------------------------------


def test_lesson_is_found_from_stamp_content_or_filename():
    cells = [(1, "def q_sample(x0, t, alpha_bar, noise):\n    pass"), (2, 'check("log_snr", log_snr)')]
    assert lesson_of(cells, {}, "anything.ipynb") == 1
    assert lesson_of([], {"course_lib": {"lesson": 3}}, "01_x.ipynb") == 3  # the release stamp wins
    assert lesson_of([], {}, "alice_04_diffusion.ipynb") == 4
    assert lesson_of([(1, "def ddim_step(): pass\ndef q_sample(): pass")], {}, "x.ipynb") is None  # two lessons
    assert lesson_of([], {"course_lib": {"lesson": 98}}, "notes.ipynb") is None  # no such lesson
    assert lesson_of([], {"course_lib": {"lesson": True}}, "03_x.ipynb") == 3  # a bool is not a lesson number
    assert lesson_of([], {"course_lib": ["junk"]}, "02_x.ipynb") == 2


def test_definitions_see_defs_assignments_imports_and_survive_magics():
    cells = [(1, "%matplotlib inline\ndef q_sample(a):\n    !ls\n    return a"), (3, "log_snr = lambda a: a"),
             (4, "from course_lib.schedules import alpha_bar_from_betas"), (5, "def q_sample(:")]
    where = definitions(cells, ["q_sample", "log_snr", "alpha_bar_from_betas"])
    assert where == {"q_sample": [1, 5], "log_snr": [3], "alpha_bar_from_betas": [4]}


def test_read_cells_rejects_broken_oversized_and_deep_files_with_a_reason():
    good = nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])).encode()
    assert read_cells(good)[0] == [(1, "x = 1")]
    for bad, match in [(b"{ not json", "not a readable notebook"), (good[: len(good) // 2], "not a readable"),
                       (b"\xff\xfe{}", "not a readable"), (b"[" * 200_000 + b"]" * 200_000, "not a readable"),
                       (b'{"cells": 3}', "no list of cells"), (b"[1, 2]", "not a JSON object")]:
        with pytest.raises(ValueError, match=match):
            read_cells(bad)
    code = json.dumps({"cells": [{"cell_type": "code", "source": "x = 1\n" * 400_000}]}).encode()
    with pytest.raises(ValueError, match="over the limit"):
        read_cells(code)
    many = json.dumps({"cells": [{"cell_type": "code", "source": ""}] * (reader.MAX_CELLS + 1)}).encode()
    with pytest.raises(ValueError, match="cells"):
        read_cells(many)


def test_a_notebook_that_would_take_gigabytes_to_parse_is_refused_by_the_reader_s_memory_limit(tmp_path):
    """32 MB of empty JSON objects is ten million dictionaries (about 700 MB): the reader process, not the grader,
    runs out of its memory, and the grader reports why. A lesson notebook reads fine."""
    path = tmp_path / "00_objects.ipynb"
    with open(path, "w") as f:
        f.write('{"cells": [' + "{}," * ((reader.MAX_NOTEBOOK_BYTES - 100) // 3) + "{}]}")
    with pytest.raises(ValueError, match="not a readable notebook"):
        B.read_submission(str(path))
    sha, cells, meta = B.read_submission(str(NOTEBOOKS / "student" / "03_samplers.ipynb"))
    assert len(sha) == 64 and any("def sample_loop" in src for _, src in cells) and meta == {"course_lib": {"lesson": 3}}


def test_text_from_submissions_is_escaped_and_capped():
    assert grading.clean("\ud800 bad") == "\\ud800 bad"
    assert grading.clean("\x1b[2Jbell\x07") == "\\x1b[2Jbell\\x07"
    assert len(grading.clean("E" * 500_000)) == B.MAX_MESSAGE_TEXT
    assert grading.clean(Exception("not a str")) == "" and grading.clean(None) == ""
    assert B.display_path(os.fsdecode(b"/x/00_bad_\xff.ipynb")) == "/x/00_bad_\\xff.ipynb"


def test_finding_submissions_refuses_what_is_not_a_regular_file_inside_the_folders(tmp_path):
    subs, outside = tmp_path / "subs", tmp_path / "outside.ipynb"
    subs.mkdir()
    _notebook(subs / "00_a.ipynb", GOOD0)
    _notebook(outside, GOOD0)
    os.mkfifo(subs / "00_fifo.ipynb")
    (subs / "00_zero.ipynb").symlink_to("/dev/zero")
    (subs / "00_out.ipynb").symlink_to(outside)
    (subs / "00_in.ipynb").symlink_to(subs / "00_a.ipynb")  # the same file: graded once
    (subs / "00_dir.ipynb").mkdir()
    (subs / ".ipynb_checkpoints").mkdir()
    _notebook(subs / ".ipynb_checkpoints" / "00_a-checkpoint.ipynb", GOOD0)
    found = {Path(s.label).name: s for s in grading.find_submissions([subs])}
    assert set(found) == {"00_a.ipynb", "00_fifo.ipynb", "00_zero.ipynb", "00_out.ipynb", "00_dir.ipynb"}
    assert not found["00_a.ipynb"].problem
    assert "FIFO" in found["00_fifo.ipynb"].problem and "a folder" in found["00_dir.ipynb"].problem
    assert "outside the given folders" in found["00_zero.ipynb"].problem
    assert "outside the given folders" in found["00_out.ipynb"].problem
    followed = {Path(s.label).name: s for s in grading.find_submissions([subs], follow_symlinks=True)}
    assert not followed["00_out.ipynb"].problem and "character device" in followed["00_zero.ipynb"].problem
    with pytest.raises(ValueError, match="FIFO"):
        B.read_submission(str(subs / "00_fifo.ipynb"))  # opened without blocking, then refused
    with pytest.raises(ValueError, match="does not exist"):
        grading.find_submissions([tmp_path / "missing"])


# ---- what the grader reads without running anything -----------------------------------------------------


def test_channel_decodes_tensors_and_refuses_frames_past_its_bounds():
    msg = {"kind": "result", "outputs": [torch.tensor(2.5), torch.arange(6.0).view(2, 3).t(),
                                         torch.zeros(0, 4, dtype=torch.int64)], "x": [float("nan"), None]}
    back = channel.decode(channel.encode(msg)[8:])
    for a, b in zip(msg["outputs"], back["outputs"]):
        assert torch.equal(a, b) and a.dtype == b.dtype
    assert back["x"][0] != back["x"][0] and back["x"][1] is None
    header = lambda obj, blob=b"": (lambda h: len(h).to_bytes(4, "little") + h + blob)(json.dumps(obj).encode())
    for payload, match in [
        (header({"$tensor": ["float32", [10 ** 8, 10 ** 8], 0, 4 * 10 ** 16]}), "shape does not match|malformed"),
        (header({"$tensor": ["float32", [4], 0, 16]}, b"\0" * 8), "past the end"),
        (header({"$tensor": ["object", [1], 0, 8]}, b"\0" * 8), "unknown dtype"),
        (header(eval("[" * 40 + "]" * 40)), "nested too deeply"),
        (b"\xff\xff\xff\x7f{}", "header larger"),
        (len(b"[" * 500_000).to_bytes(4, "little") + b"[" * 500_000, "unreadable header"),
        (header({"n": 0}).replace(b"0", b"1" * 5000), "unreadable header"),
    ]:
        with pytest.raises(channel.BadMessage, match=match):
            channel.decode(payload)


def _rules(*names):
    from course_lib.exercises import EXERCISES, LIBRARY_EQUIVALENTS

    return {n: scan.Rule(frozenset(LIBRARY_EQUIVALENTS.get(n, ())), EXERCISES[n].refused) for n in names}


def _findings(cells, *names, trusted=()):
    from course_lib.exercises import EXERCISES

    tamper, per = scan.scan(list(enumerate(cells, 1)), {scan.normalize(c) for c in trusted}, _rules(*names),
                            {ex.reference.__name__ for ex in EXERCISES.values()})
    return [f.what for f in tamper], {n: sorted((f.kind, f.what) for f in per[n]) for n in names}


def test_the_scan_follows_the_graded_function_through_the_notebook_by_scope():
    lesson = ("import torch\nfrom course_lib import schedules", "import inspect\nprint(inspect.getsource(schedules.q_sample))")
    cells = [*lesson,
             "lib = schedules.alpha_bar_from_betas\ndef helper(b):\n    return lib(b)",
             "def alpha_bar_from_betas(betas):\n    return helper(betas)",
             "def log_snr(alpha_bar):\n    return torch.log(alpha_bar / (1 - alpha_bar))\n"
             "assert torch.allclose(log_snr(ab), schedules.log_snr_from_alpha_bar(ab))",  # a self-check: fine
             "from course_lib.forward import q_sample\n"
             "def q_sample(x0, t, alpha_bar, noise):\n    sample = alpha_bar[t]\n    return sample.sqrt() * x0\n"
             "%run evil.py\nx = getattr(torch, 'lo' + 'ad')\nsignal.signal(14, print)"]
    tamper, found = _findings(cells, "alpha_bar_from_betas", "log_snr", "q_sample", trusted=lesson)
    assert found["alpha_bar_from_betas"] == [("copy", "uses course_lib.schedules.alpha_bar_from_betas, which computes "
                                                      "this answer")]
    assert found["log_snr"] == [] and found["q_sample"] == []  # the later def replaces the import; `sample` is local
    assert {"uses the magic %run (runs code from elsewhere)", "looks names up dynamically (getattr() with a computed "
            "attribute name)"} <= set(tamper)
    assert not any("inspect" in w for w in tamper)  # the lesson itself uses inspect


@pytest.mark.parametrize("cells, name, kind, fragment", [
    (["from course_lib import schedules", "def make():\n    f = schedules.alpha_bar_from_betas\n    return lambda b: f(b)\n"
      "alpha_bar_from_betas = make()"], "alpha_bar_from_betas", "copy", "computes this answer"),
    (["import course_lib.forward", "def setup():\n    global q_sample\n    q_sample = course_lib.forward.q_sample",
      "setup()"], "q_sample", "copy", "computes this answer"),
    (["import functools\nfrom course_lib import schedules as S",
      "alpha_bar_from_betas = functools.partial(S.alpha_bar_from_betas)"], "alpha_bar_from_betas", "copy", "computes"),
    (["from course_lib import schedules", "@(lambda f: schedules.alpha_bar_from_betas)\ndef alpha_bar_from_betas(b):\n"
      "    return b"], "alpha_bar_from_betas", "copy", "computes this answer"),
    (["from course_lib.exercises import ref_q_sample as r", "def q_sample(*a):\n    return r(*a)"], "q_sample", "copy",
     "exercise references"),
    (["from course_lib import schedules", "def alpha_bar_from_betas(b):\n    return schedules.NoiseSchedule(b).alpha_bar"],
     "alpha_bar_from_betas", "review", "can compute this answer"),
    (["from course_lib.text2image import load_text_to_image\nm = load_text_to_image('shapes_ldm')",
      "def cross_attention(x, context, mask, w_q, w_k, w_v, heads):\n    return type(m.unet.mid)(x)"], "cross_attention",
     "review", "object made by course_lib.text2image.load_text_to_image"),
    (["from course_lib import runtime\ndevice = runtime.get_device()", "import torch\ndef q_sample(x0, t, alpha_bar, noise):\n"
      "    return alpha_bar[t].to(device)"], "q_sample", None, None),  # an object the library made, harmless
    (["import torch, io\nf = torch.load(io.BytesIO(b'x'), weights_only=False)", "def alpha_bar_from_betas(b):\n"
      "    return f(b)"], "alpha_bar_from_betas", "review", "torch.load"),
    (["import functools, course_lib", "def alpha_bar_from_betas(b):\n    return functools.reduce(getattr, ['schedules', "
      "'alpha_bar_from_betas'], course_lib)(b)"], "alpha_bar_from_betas", "review", "getattr used as a value"),
    (["import builtins\nfrom course_lib import schedules\nbuiltins.helper = schedules.alpha_bar_from_betas",
      "def alpha_bar_from_betas(b):\n    return helper(b)"], "alpha_bar_from_betas", "review", "no cell defines"),
    (["from course_lib.samplers import sample", "def loop(denoise, x, sigmas, y, scale):\n"
      "    return sample(denoise, x, sigmas=sigmas).x", "def text_to_shapes():\n    return {'cross_attention': None, "
      "'train_step': None, 'sample_loop': loop}"], "text_to_shapes", "copy", "computes this answer"),  # the capstone
    (["import torch.nn.functional as F", "def cross_attention(x, context, mask, w_q, w_k, w_v, heads):\n"
      "    return F.scaled_dot_product_attention(x, x, x)"], "cross_attention", "refused", "scaled_dot_product"),
    (["from torch import nn\nmha = nn.MultiheadAttention(8, 2)", "def dit_block(*args):\n    return mha(*args)"],
     "dit_block", "refused", "torch.nn.MultiheadAttention"),
    (["from diffusers import DDIMScheduler", "def karras_sigmas(n, sigma_min, sigma_max, rho):\n"
      "    return DDIMScheduler().sigmas"], "karras_sigmas", "refused", "diffusers"),
])
def test_the_scan_finds_copies_refused_libraries_and_what_it_cannot_follow(cells, name, kind, fragment):
    _, found = _findings(cells, name)
    if kind is None:
        assert found[name] == []
        return
    assert any(k == kind and fragment in w for k, w in found[name]), found[name]
    if kind == "review":
        assert not any(k == "copy" for k, _ in found[name])  # not enough evidence to take the points


def test_the_scan_is_linear_in_the_code():
    """`x = x = ... = 1` (24 kB) and a chain of 2,000 helpers, each named by the next: every statement is read at most
    twice (once for the notebook's tamper scan, once when the graded function reaches it)."""
    import course_lib.grading.scan as S

    calls = []
    real = S.global_refs

    def counting(node):
        calls.append(id(node))
        return real(node)

    chain = "\n".join(f"def h{i}(b):\n    return h{i - 1}(b)" for i in range(1, 2000))
    cells = ["x = " * 6000 + "1", "def h0(b):\n    return x", chain, "def alpha_bar_from_betas(b):\n    return h1999(b)"]
    S.global_refs = counting
    try:
        _findings(cells, "alpha_bar_from_betas")
    finally:
        S.global_refs = real
    from collections import Counter

    assert len(set(calls)) == 2002 and max(Counter(calls).values()) <= 2


def test_the_library_graph_agrees_with_what_runs():
    """Static reachability against a run-time trace: what NoiseSchedule(b).alpha_bar and samplers.sample call."""
    from course_lib import samplers, schedules
    from course_lib.grading.libgraph import graph

    lib = graph()
    seen = set()

    def trace(frame, event, arg):
        if event == "call" and frame.f_globals.get("__name__", "").startswith("course_lib"):
            seen.add(f"{frame.f_globals['__name__']}.{frame.f_code.co_name}")

    from course_lib.analytic import gaussian_denoiser

    sys.setprofile(trace)
    try:
        schedules.NoiseSchedule(torch.linspace(1e-4, 0.02, 20, dtype=torch.float64)).alpha_bar
        samplers.sample(gaussian_denoiser(0.5), torch.randn(10, 2), sampler="dpmpp_2m", steps=5)
    finally:
        sys.setprofile(None)
    assert {"course_lib.schedules.alpha_bar_from_betas", "course_lib.samplers.sample_dpmpp_2m"} <= seen
    assert "course_lib.schedules.NoiseSchedule" in lib.reaching(frozenset({"course_lib.schedules.alpha_bar_from_betas"}))
    assert "course_lib.samplers.sample" in lib.reaching(frozenset({"course_lib.samplers.sample_dpmpp_2m"}))
    assert "course_lib.plotting.scatter_2d" not in lib.reaching(frozenset({"course_lib.samplers.sample_dpmpp_2m"}))
    assert lib.node("course_lib.nets.CrossAttention") == "course_lib.nets.cross_attention.CrossAttention"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="seccomp is Linux's")
def test_after_confinement_the_kernel_refuses_threads_and_processes_however_they_are_started():
    """A thread through threading, through the original _thread function the audit hook never saw, or a fork: the
    seccomp filter refuses the clone itself, so no Python-level bypass helps. torch keeps working."""
    script = textwrap.dedent("""
        import os, _thread, threading, torch
        from course_lib.grading import sandbox
        start = _thread.start_new_thread
        assert sandbox.seccomp_confine()
        out = []
        for name, go in [("threading", lambda: threading.Thread(target=print).start()),
                         ("_thread", lambda: start(print, ())), ("fork", os.fork)]:
            try:
                go()
                out.append(name + " started")
            except (RuntimeError, OSError) as e:
                out.append(name + " refused")
        x = torch.randn(64, 64, requires_grad=True)
        (x @ x).sum().backward()
        print(out, bool(torch.isfinite(x.grad).all()))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    # one thread for every math library, as the grader's worker has (session.py): a library that starts its own
    # threads after the filter is installed is refused like any other thread
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "['threading refused', '_thread refused', 'fork refused'] True"


# ---- hostile and broken submissions, one batch --------------------------------------------------

# name -> (cells, {exercise: expected status}, text the messages must contain, expected flag)
P, F, T, N = "passed", "failed", "timeout", "not_attempted"
ALL1 = ("alpha_bar_from_betas", "q_sample", "log_snr")
CASES = {
    # the control, and what the first grader already handled
    "00_good": ([IMPORTS, GOOD0, CHECK0], {"noise_images": P}, "fresh random", ""),
    "00_wrong": ([IMPORTS, WRONG0, CHECK0], {"noise_images": F}, "own sigma", ""),
    "00_nan": ([IMPORTS, "def noise_images(x, sigma, noise):\n    return x * float('nan')"], {"noise_images": F}, "NaN", ""),
    "00_returns_none": ([IMPORTS, "def noise_images(x, sigma, noise):\n    y = x * 2"], {"noise_images": F}, "return", ""),
    "00_raises": ([IMPORTS, "def noise_images(x, sigma, noise):\n    raise KeyError('oops')"], {"noise_images": F},
                  "KeyError", ""),
    "00_cell_exception": ([IMPORTS, "raise RuntimeError('broken cell')", GOOD0], {"noise_images": P}, "", ""),
    "00_syntax_error": ([IMPORTS, "def noise_images(x, sigma, noise)\n    return x"], {"noise_images": F},
                        "SyntaxError", ""),
    "00_infinite_loop": ([IMPORTS, GOOD0, "while True:\n    pass"], {"noise_images": P}, "", ""),
    "00_loop_ignores_alarm": ([IMPORTS, GOOD0, "while True:\n    try:\n        while True:\n            pass\n"
                               "    except BaseException:\n        pass"], {"noise_images": P}, "skipped", ""),
    "00_slow_function": ([IMPORTS, "def noise_images(x, sigma, noise):\n    while True:\n        pass"],
                         {"noise_images": T}, "did not return", ""),
    "00_sys_exit": ([IMPORTS, "sys.exit(3)", GOOD0], {"noise_images": P}, "", ""),
    "00_os_exit": ([IMPORTS, GOOD0, "os._exit(0)"], {"noise_images": P}, "ended the grading process", ""),
    "00_kills_itself": ([IMPORTS, "os.kill(os.getpid(), signal.SIGKILL)", GOOD0], {"noise_images": P}, "signal 9",
                        "review"),
    "00_memory_blowup": ([IMPORTS, "hog = [bytearray(1 << 28) for _ in range(10_000)]", GOOD0], {"noise_images": P},
                         "", ""),
    "00_memory_in_function": ([IMPORTS, "def noise_images(x, sigma, noise):\n    return torch.empty(1 << 40)"],
                              {"noise_images": F}, "RuntimeError", ""),
    "00_fork": ([IMPORTS, "pid = os.fork()\nif pid == 0:\n    while True: pass", GOOD0,
                 "import subprocess\nsubprocess.Popen(['sleep', '600'])"], {"noise_images": P}, "", ""),
    "00_vandal": ([IMPORTS, "VICTIM", GOOD0], {"noise_images": F}, "signalling other processes", "tampered"),
    "00_types_coroutine": ([IMPORTS, "import types\n@types.coroutine\ndef waits():\n    yield", GOOD0],
                           {"noise_images": P}, "", ""),
    "00_deleted_exercise": ([IMPORTS, "print('I removed the exercise')"], {"noise_images": N}, "deleted", ""),
    "00_duplicated_exercise": ([IMPORTS, WRONG0, CHECK0, GOOD0, CHECK0], {"noise_images": P}, "cells 3, 5", ""),
    "00_not_a_function": ([IMPORTS, "noise_images = 3"], {"noise_images": F}, "not a function", ""),
    "01_mixed": ([IMPORTS, GOOD1[0], "def q_sample(x0, t, alpha_bar, noise):\n    os._exit(1)", GOOD1[2]],
                 {"alpha_bar_from_betas": P, "q_sample": F, "log_snr": P}, "", ""),
    "00_surrogate_raises": ([IMPORTS, "def noise_images(x, sigma, noise):\n    raise ValueError('\\ud800 lone')"],
                            {"noise_images": F}, "\\ud800 lone", ""),
    "00_surrogate_cell": ([IMPORTS, "print('\\udcff'); raise RuntimeError('\\ud800')", GOOD0], {"noise_images": P},
                          "", ""),
    "00_long_type_name": ([IMPORTS, "def noise_images(x, sigma, noise):\n"
                           "    raise type('E' * 500_000, (Exception,), {})('secret ' * 100_000)"],
                          {"noise_images": F}, "EEEE", ""),
    "00_control_chars": ([IMPORTS, "def noise_images(x, sigma, noise):\n    raise ValueError('\\x1b[2J\\x07=1+1')"],
                         {"noise_images": F}, "\\x1b[2J", ""),
    "00_unreadable_message": ([IMPORTS, "class Bad(Exception):\n    def __str__(self):\n        raise RuntimeError\n"
                               "def noise_images(x, sigma, noise):\n    raise Bad()"],
                              {"noise_images": F}, "could not be read", ""),
    "00_deep_assignments": ([IMPORTS, "x = " * 6000 + "1", GOOD0], {"noise_images": P}, "", ""),
    # nothing watches a graded call from inside: no profiler, no tracer (they made honest code 10,000x slower)
    "00_no_instrumentation": ([IMPORTS, "def noise_images(x, sigma, noise):\n"
                               "    assert sys.getprofile() is None and sys.gettrace() is None\n"
                               "    return x + sigma.view(-1, *[1] * (x.ndim - 1)) * noise"], {"noise_images": P}, "", ""),
    # forging a grade: the verdict is made in the grader, so the worker has nothing to forge
    "00_forger": ([IMPORTS, WRONG0, "import course_lib, course_lib.exercises as E\n"
                   "E.judge = lambda *a, **k: None\ncourse_lib.check = check = lambda *a: print('passed') or True\n"
                   "print('noise_images: passed. 1/1 points')", CHECK0], {"noise_images": F}, "own sigma", "tampered"),
    "00_replaces_code": ([IMPORTS, GOOD0, "def other(x, sigma, noise):\n    return x\n"
                          "noise_images.__code__ = other.__code__"], {"noise_images": F},
                         "replacing a function's __code__", "tampered"),
    "01_forges_the_channel": ([IMPORTS, "def alpha_bar_from_betas(betas):\n    return betas * 0", *GOOD1[1:],
                               "FORGE"], {"alpha_bar_from_betas": F, "q_sample": F, "log_snr": F}, "channel",
                              "tampered"),
    "00_ctypes": ([IMPORTS, "import ctypes\nprint(ctypes.CDLL(None).getpid())", GOOD0], {"noise_images": F},
                  "native code", "tampered"),
    "00_cffi": ([IMPORTS, "import cffi\nffi = cffi.FFI()", GOOD0], {"noise_images": F}, "cffi", "tampered"),
    "00_threads": ([IMPORTS, "import threading\nthreading.Thread(target=print).start()", GOOD0], {"noise_images": P},
                   "", ""),
    # processes and the network
    "00_setsid_child": ([IMPORTS, SPAWN, GOOD0], {"noise_images": P}, "", "review"),
    "00_udp": ([IMPORTS, "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "s.sendto(b'leak', ('127.0.0.1', UDP_PORT))", "import _socket\n"
                "_socket.socket(2, 2).sendto(b'leak', ('127.0.0.1', UDP_PORT))", GOOD0], {"noise_images": P}, "",
               "review"),
    "00_unix_socket": ([IMPORTS, "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(UNIX_PATH)\n"
                        "s.sendall(b'leak')", GOOD0], {"noise_images": P}, "", "review"),
    # privacy
    "00_snoop": ([IMPORTS, "SNOOP", GOOD0], {"noise_images": F}, "reading", "tampered"),
    "01_reads_solutions": ([IMPORTS, f"src = open({str(NOTEBOOKS / '01_forward_process.ipynb')!r}).read()", *GOOD1],
                           {n: F for n in ALL1}, "reading", "tampered"),
    "01_reads_references": ([IMPORTS, f"src = open({str(ROOT / 'course_lib' / 'exercises' / 'lesson01.py')!r}).read()",
                             f"names = os.listdir({str(ROOT / 'course_lib' / 'exercises')!r})", *GOOD1],
                            {n: F for n in ALL1}, "reading", "tampered"),
    "00_imports_what_it_wrote": ([IMPORTS, "open('helper.py', 'w').write('def noise_images(x, sigma, noise):\\n'\n"
                                  "'    return x + sigma.view(-1, *[1] * (x.ndim - 1)) * noise\\n')",
                                  "from helper import noise_images"], {"noise_images": F}, "ModuleNotFoundError", ""),
    # behaviour: the oracles stay in the grader
    "03_euler": ([IMPORTS, EULER], {"sample_loop": P}, "spread", ""),
    "03_course_data": ([IMPORTS, "from course_lib.data import ring_of_gaussians\n"
                        "def sample_loop(denoise, x, sigmas):\n    return ring_of_gaussians(8, 1.0, 0.08).sample(len(x))"],
                       {"sample_loop": F}, "land near one of", ""),
    "03_heun_catches_the_budget": ([IMPORTS, "def sample_loop(denoise, x, sigmas):\n"
                                    "    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):\n"
                                    "        try:\n            d = denoise(x, s)\n            d2 = denoise(x, s)\n"
                                    "        except Exception:\n            pass\n"
                                    "        x = d if s_next == 0 else x + (s_next - s) * (x - d) / s\n    return x"],
                                   {"sample_loop": F}, "more than the budget", ""),
    "03_looks_inside_the_oracle": ([IMPORTS, "def sample_loop(denoise, x, sigmas):\n"
                                    "    return denoise.fn.__self__.modes[torch.randint(3, (len(x),))]"],
                                   {"sample_loop": F}, "AttributeError", "review"),
    "03_asks_for_another_oracle": ([IMPORTS, "def sample_loop(denoise, x, sigmas):\n"
                                    "    denoise._chan.send('oracle', oracle='mixture', args=[], kwargs={})\n"
                                    "    return denoise._chan.recv()"], {"sample_loop": F}, "channel", "tampered"),
    "03_off_the_schedule": ([IMPORTS, EULER.replace("denoise(x, s)", "denoise(x, s * 1.01)")], {"sample_loop": P},
                            "noise levels that are not the schedule's", "review"),
    "10_course_captions": ([IMPORTS, "from course_lib.captions import caption_corpus\n"
                            "def unmask_sample(denoise, x, steps, mask_id):\n"
                            "    return caption_corpus(len(x), 'train', seed=1)[0]"], {"unmask_sample": F},
                           "rows of the corpus", ""),
}
# copies and shortcuts: what each earns, and the one rule over all of them: no point without a flag
COPIES = {
    "00_copies_reference": ([IMPORTS, "from course_lib.exercises import ref_noise_images\n"
                             "def noise_images(x, sigma, noise):\n    return ref_noise_images(x, sigma, noise)"],
                            {"noise_images": F}, "exercise references", "library_reference"),
    "01_library": ([IMPORTS, "from course_lib.schedules import alpha_bar_from_betas", *GOOD1[1:]],
                   {"alpha_bar_from_betas": F, "q_sample": P, "log_snr": P}, "computes this answer", "library_reference"),
    "01_alias_helper": ([IMPORTS, LIB, "lib = schedules.alpha_bar_from_betas\ndef helper(b):\n    return lib(b)",
                         "def alpha_bar_from_betas(betas):\n    return helper(betas)", *GOOD1[1:]],
                        {"alpha_bar_from_betas": F, "q_sample": P, "log_snr": P}, "computes", "library_reference"),
    "01_closure_factory": ([IMPORTS, LIB, "def make():\n    f = schedules.alpha_bar_from_betas\n    return lambda b: f(b)\n"
                            "alpha_bar_from_betas = make()", *GOOD1[1:]],
                           {"alpha_bar_from_betas": F, "q_sample": P, "log_snr": P}, "computes", "library_reference"),
    "01_global_declaration": ([IMPORTS, "import course_lib.forward\ndef setup():\n    global q_sample\n"
                               "    q_sample = course_lib.forward.q_sample", GOOD1[0],
                               "def q_sample(x0, t, alpha_bar, noise):\n    raise NotImplementedError", GOOD1[2],
                               "setup()"], {"alpha_bar_from_betas": P, "q_sample": F, "log_snr": P}, "computes",
                              "library_reference"),
    "01_partial": ([IMPORTS, LIB, "import functools\n"
                    "alpha_bar_from_betas = functools.partial(schedules.alpha_bar_from_betas)", *GOOD1[1:]],
                   {"alpha_bar_from_betas": F, "q_sample": P, "log_snr": P}, "computes", "library_reference"),
    "01_bytecode_clone": ([IMPORTS, LIB, "import types\nf = schedules.alpha_bar_from_betas\n"
                           "alpha_bar_from_betas = types.FunctionType(f.__code__.replace(co_name='mine'), f.__globals__)",
                           *GOOD1[1:]], {n: F for n in ALL1}, "computes", "library_reference"),
    "01_jit_trace": ([IMPORTS, LIB, "traced = torch.jit.trace(schedules.alpha_bar_from_betas, "
                      "torch.rand(9, dtype=torch.float64) * 0.1)\ndef alpha_bar_from_betas(betas):\n"
                      "    return traced(betas)", *GOOD1[1:]],
                     {"alpha_bar_from_betas": F, "q_sample": P, "log_snr": P}, "computes", "library_reference"),
    "01_lazy_subclass": ([IMPORTS, LIB, "class Lazy(torch.Tensor):\n    @classmethod\n"
                          "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
                          "        with torch._C.DisableTorchFunctionSubclass():\n"
                          "            return schedules.alpha_bar_from_betas(args[0].as_subclass(torch.Tensor))\n"
                          "def alpha_bar_from_betas(betas):\n    return betas.as_subclass(Lazy)", *GOOD1[1:]],
                         {"alpha_bar_from_betas": F, "q_sample": P, "log_snr": P}, "computes", "library_reference"),
    "01_thread": ([IMPORTS, LIB, "import threading\ndef alpha_bar_from_betas(betas):\n    out = []\n"
                   "    t = threading.Thread(target=lambda: out.append(schedules.alpha_bar_from_betas(betas)))\n"
                   "    t.start(); t.join()\n    return out[0]", *GOOD1[1:]],
                  {"alpha_bar_from_betas": F, "q_sample": P, "log_snr": P}, "computes", "library_reference"),
    "01_indirect_class": ([IMPORTS, LIB, "def alpha_bar_from_betas(betas):\n"
                           "    return schedules.NoiseSchedule(betas).alpha_bar", *GOOD1[1:]],
                          {"alpha_bar_from_betas": P, "q_sample": P, "log_snr": P}, "can compute this answer", "review"),
    "01_hidden_name": ([IMPORTS, LIB, "name = 'alpha_bar_' + 'from_betas'\ndef alpha_bar_from_betas(betas):\n"
                        "    return getattr(schedules, name)(betas)", *GOOD1[1:]],
                       {"alpha_bar_from_betas": P, "q_sample": P, "log_snr": P}, "computed attribute name", "review"),
    "01_importlib": ([IMPORTS, "import importlib\ndef alpha_bar_from_betas(betas):\n"
                      "    return importlib.import_module('course_lib.sched' + 'ules').alpha_bar_from_betas(betas)",
                      *GOOD1[1:]], {n: P for n in ALL1}, "importlib", "review"),
    "01_vars_module": ([IMPORTS, LIB, "def alpha_bar_from_betas(betas):\n"
                        "    return vars(schedules)['alpha_bar_from_betas'](betas)", *GOOD1[1:]],
                       {n: P for n in ALL1}, "vars()", "review"),
    "01_sys_modules": ([IMPORTS, LIB, "def alpha_bar_from_betas(betas):\n"
                        "    return sys.modules['course_lib.schedules'].alpha_bar_from_betas(betas)", *GOOD1[1:]],
                       {n: P for n in ALL1}, "sys.modules", "review"),
    "01_pickled_function": ([IMPORTS, LIB, "import io\nbuf = io.BytesIO()\ntorch.save(schedules.alpha_bar_from_betas, buf)",
                             "buf.seek(0)\nf = torch.load(buf, weights_only=False)\ndef alpha_bar_from_betas(betas):\n"
                             "    return f(betas)", *GOOD1[1:]], {n: P for n in ALL1}, "torch.load", "review"),
    "01_source_reexec": ([IMPORTS, LIB, "import inspect\nns = dict(vars(schedules))\n"
                          "exec(inspect.getsource(schedules.alpha_bar_from_betas).replace('def alpha_bar_from_betas', "
                          "'def mine'), ns)\nalpha_bar_from_betas = ns['mine']", *GOOD1[1:]],
                         {n: P for n in ALL1}, "vars()", "review"),
}
FORGE_NAMES = ("01_forges_the_channel",)


def _vandal_cell(victim: Path, out: Path) -> str:
    """Try, from a submission, to damage the instructor's files, the CSV and course_lib itself."""
    return (f"import course_lib\nVICTIM, OUT = {str(victim)!r}, {str(out)!r}\n"
            "attempts = [lambda: open(os.path.join(VICTIM, 'keep.txt'), 'w').write('pwned'),\n"
            "            lambda: os.remove(os.path.join(VICTIM, 'keep.txt')),\n"
            "            lambda: shutil.rmtree(VICTIM),\n"
            "            lambda: open(OUT, 'w').write('submission,exercise,points\\nme,all,999'),\n"
            "            lambda: open(OUT + '.journal', 'a').write('{}'),\n"
            "            lambda: open(os.path.join(VICTIM, 'new.txt'), 'x'),\n"
            "            lambda: os.rename(os.path.join(VICTIM, 'keep.txt'), 'stolen.txt'),\n"
            "            lambda: open(os.path.join(os.path.dirname(course_lib.__file__), 'schedules.py'), 'a').write('#'),\n"
            "            lambda: os.kill(os.getppid(), signal.SIGKILL)]\n"
            "for attempt in attempts:\n    try:\n        attempt()\n        print('DAMAGE DONE')\n"
            "    except Exception as e:\n        print('refused:', e)\n"
            "open('mine.txt', 'w').write('scratch is writable')")


def _snoop_cell(subs: Path, out: Path, scratch: Path) -> str:
    """Try to read a classmate's submission, the journal, other workers' scratch folders and the grader's variables."""
    return (f"found = []\nfor path in [{str(subs / '00_good.ipynb')!r}, {str(out) + '.journal'!r},\n"
            f"             f'/proc/{{os.getppid()}}/environ']:\n"
            "    try:\n        found.append(open(path).read()[:50])\n    except Exception as e:\n"
            "        print('refused:', type(e).__name__)\n"
            f"for folder in [{str(scratch)!r}, {str(subs)!r}]:\n"
            "    try:\n        found += os.listdir(folder)\n"
            "        found += [os.listdir(os.path.join(folder, d)) for d in os.listdir(folder)]\n"
            "    except Exception as e:\n        print('refused:', type(e).__name__)\n"
            "print('GRADER_SECRET' in repr(found) or 'GRADER_SECRET' in repr(dict(os.environ)))\n"
            "if found:\n    raise RuntimeError(repr(found)[:100])")


def _forge_cell() -> str:
    """Write a well-formed 'result' frame claiming an answer, and a 'done', to every file descriptor."""
    return ("from course_lib.grading import channel\nimport torch\n"
            "forged = channel.encode({'kind': 'result', 'name': 'alpha_bar_from_betas', 'index': 0, "
            "'output': torch.zeros(3), 'refused': []})\n"
            "done = channel.encode({'kind': 'done', 'refused': []})\n"
            "for fd in range(3, 256):\n    try:\n        os.write(fd, forged + done)\n    except OSError:\n        pass")


def _write_cases(subs: Path, victim: Path, out: Path, scratch: Path, udp_port: int, unix_path: str) -> None:
    special = {"VICTIM": _vandal_cell(victim, out), "SNOOP": _snoop_cell(subs, out, scratch), "FORGE": _forge_cell()}
    for name, (cells, *_rest) in {**CASES, **COPIES}.items():
        cells = [special.get(c, c).replace("UDP_PORT", str(udp_port)).replace("UNIX_PATH", repr(unix_path))
                 for c in cells]
        _notebook(subs / f"{name}.ipynb", *cells)
    good = nbformat.writes(nbformat.read(subs / "00_good.ipynb", as_version=4))
    (subs / "00_malformed.ipynb").write_text("{ this is not json")
    (subs / "00_truncated.ipynb").write_text(good[: len(good) // 2])
    (subs / "notes.ipynb").write_text(nbformat.writes(nbformat.v4.new_notebook()))  # no lesson to be found
    _notebook(os.fsencode(subs) + b"/00_name_\xff\xfe.ipynb", IMPORTS, GOOD0)  # not UTF-8: from an unzipped archive
    os.mkfifo(subs / "00_fifo.ipynb")
    (subs / "00_zero.ipynb").symlink_to("/dev/zero")
    (subs / "00_folder.ipynb").mkdir()
    (subs / "00_huge.ipynb").write_text(json.dumps({"cells": [{"cell_type": "code", "source": "x = 1\n" * 2_200_000}]}))
    with open(subs / "00_empty_objects.ipynb", "w") as f:  # 32 MB of {}: about 700 MB if parsed
        f.write('{"cells": [' + "{}," * ((reader.MAX_NOTEBOOK_BYTES - 100) // 3) + "{}]}")


BROKEN = {"00_malformed.ipynb": "not a readable notebook", "00_truncated.ipynb": "not a readable notebook",
          "00_fifo.ipynb": "FIFO", "00_zero.ipynb": "outside the given folders", "00_folder.ipynb": "a folder",
          "00_huge.ipynb": "over the limit", "00_empty_objects.ipynb": "not a readable notebook"}


def _grade_in_subprocess(subs, out, json_out, scratch, limits: Limits, env_extra=None) -> int:
    """Run grade_batch in a fresh process (as the CLI would) and return that process's peak resident memory in MB."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would include the pytest process's size
    script = ("from course_lib.grading import Limits, grade_batch\n"
              f"grade_batch([{str(subs)!r}], {str(out)!r}, {str(json_out)!r}, limits=Limits(**{limits.__dict__!r}), "
              f"jobs=2, echo=lambda s: None, scratch_base={str(scratch)!r})\n"
              "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])")
    env = {**os.environ, "GRADER_SECRET": "GRADER_SECRET-do-not-leak", **(env_extra or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.strip().splitlines()[-1]) // 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs, /proc and the kernel layers are Linux's")
def test_hostile_batch(tmp_path):
    subs, victim, scratch = tmp_path / "subs", tmp_path / "instructor", tmp_path / "scratch"
    for d in (subs, victim, scratch):
        d.mkdir()
    (victim / "keep.txt").write_text("the instructor's file")
    out = victim / "grades.csv"
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    unix_path = str(tmp_path / "listener.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen(4)
    unix.setblocking(False)
    _write_cases(subs, victim, out, scratch, udp.getsockname()[1], unix_path)
    course = ROOT / "course_lib"
    before = _snapshot(victim) | {"course_lib": hashlib.sha256(b"".join(p.read_bytes() for p in sorted(
        course.rglob("*.py")))).hexdigest()}

    peak_mb = _grade_in_subprocess(subs, out, victim / "grades.json", scratch, FAST)

    rows = _rows(out)
    wrong = []  # every case checked before failing: one run shows them all
    for name, (_, expected, fragment, flag) in {**CASES, **COPIES}.items():
        for exercise, status in expected.items():
            row = rows[(f"{name}.ipynb", exercise)]
            if row["status"] != status or int(row["points"]) != (status == "passed") * int(row["max_points"]):
                wrong.append((name, exercise, "status", row))
            assert len(row["message"]) <= B.MAX_MESSAGE_TEXT, (name, len(row["message"]))
        texts = " ".join(rows[(f"{name}.ipynb", e)]["message"] for e in expected)
        if fragment not in texts:
            wrong.append((name, "message lacks", fragment, texts))
        flags = {rows[(f"{name}.ipynb", e)]["flag"] for e in expected}
        if not (flag in flags and (flag or flags == {""})):
            wrong.append((name, "flags", flag, flags))
    assert not wrong, "\n".join(map(repr, wrong))
    for name in COPIES:  # a copy never earns a point without a flag
        copied = "q_sample" if name == "01_global_declaration" else "noise_images" if name[:2] == "00" else \
            "alpha_bar_from_betas"
        row = rows[(f"{name}.ipynb", copied)]
        assert row["points"] == "0" or row["flag"], (name, row)
    for broken, why in BROKEN.items():
        row = rows[(broken, "noise_images")]
        assert row["status"] == "error" and why in row["message"] and broken in row["message"], (broken, row)
    assert rows[("notes.ipynb", grading.WHOLE_NOTEBOOK)]["status"] == "error"
    assert rows[("00_name_\\xff\\xfe.ipynb", "noise_images")]["status"] == "passed"
    from course_lib.exercises import EXERCISES

    per_lesson = lambda name: sum(ex.lesson == int(name[:2]) for ex in EXERCISES.values())  # noqa: E731
    n_rows = sum(per_lesson(name) for name in {**CASES, **COPIES}) + len(BROKEN) + 2
    saved = json.loads((victim / "grades.json").read_text())
    assert len(rows) == n_rows == sum(saved["totals"]["status"].values())  # every submission, no row twice
    assert "GRADER_SECRET" not in out.read_text()
    records = {Path(r["submission"]).name: r for r in saved["submissions"]}
    # nothing outside the scratch folders changed, and the scratch folders are gone
    after = _snapshot(victim) | {"course_lib": hashlib.sha256(b"".join(p.read_bytes() for p in sorted(
        course.rglob("*.py")))).hexdigest()}
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= {"grades.csv", "grades.csv.journal", "grades.json"}, changed
    assert (victim / "keep.txt").read_text() == "the instructor's file"
    assert list(scratch.iterdir()) == []
    # what each hostile notebook tried was refused, and recorded
    refused = lambda name: " ".join(records[f"{name}.ipynb"]["refused"])  # noqa: E731
    assert "starting processes" in refused("00_fork") and "network" in refused("00_udp")
    assert "reading" in refused("01_reads_solutions") and "course_lib/exercises" in refused("01_reads_references")
    assert "importing course_lib.exercises" in refused("00_forger") and "importing cffi" in refused("00_cffi")
    assert "reading" in refused("01_reads_references") and "listing" in refused("01_reads_references")
    assert "starting threads" in refused("00_threads")
    assert "native code" in refused("00_ctypes")
    exits = records["00_os_exit.ipynb"]
    assert any("cell 4 was skipped" in n for n in exits["notes"])
    assert all(r["sandbox"][-1] == "audit hook" for r in saved["submissions"] if r["sandbox"])
    assert all(len(r["notes"]) <= B.MAX_NOTES for r in saved["submissions"])
    # no process outlived its grading, nothing reached the network, and the grader stayed small
    assert _escapees() == []
    with pytest.raises(BlockingIOError):
        udp.recv(100)
    with pytest.raises(BlockingIOError):
        unix.accept()
    assert peak_mb < 1024, f"the grader's peak memory was {peak_mb} MB"


FALLBACK = {
    "00_good": ([IMPORTS, GOOD0], {"noise_images": P}, ""),
    "00_setsid_child": ([IMPORTS, SPAWN, GOOD0], {"noise_images": P}, "review"),
    "01_forges_the_channel": ([IMPORTS, "def alpha_bar_from_betas(betas):\n    return betas * 0", *GOOD1[1:], "FORGE"],
                              {"alpha_bar_from_betas": F, "q_sample": F, "log_snr": F}, "tampered"),
    "01_floods_the_channel": ([IMPORTS, *GOOD1, "import struct\nfor fd in range(3, 256):\n    try:\n"
                               "        os.write(fd, struct.pack('<Q', 1 << 60) + b'[' * 65536)\n"
                               "    except OSError:\n        pass"],
                              {"alpha_bar_from_betas": F, "q_sample": F, "log_snr": F}, "tampered"),
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and subreapers are Linux's")
def test_without_the_kernel_layers_escaped_processes_are_killed_and_forgeries_caught(tmp_path):
    """Where Landlock and seccomp are missing, a submission can start a process and write to the channel: the
    grader kills what outlives the worker and refuses (and flags) what arrives out of order."""
    subs, scratch = tmp_path / "subs", tmp_path / "scratch"
    subs.mkdir()
    scratch.mkdir()
    for name, (cells, _, _) in FALLBACK.items():
        _notebook(subs / f"{name}.ipynb", *[_forge_cell() if c == "FORGE" else c for c in cells])
    limits = Limits(**{**FAST.__dict__, "landlock": False, "seccomp": False})
    peak_mb = _grade_in_subprocess(subs, tmp_path / "g.csv", tmp_path / "g.json", scratch, limits)
    rows = _rows(tmp_path / "g.csv")
    for name, (_, expected, flag) in FALLBACK.items():
        for exercise, status in expected.items():
            row = rows[(f"{name}.ipynb", exercise)]
            assert row["status"] == status and row["flag"] == flag, (name, row)
    sandbox = json.loads((tmp_path / "g.json").read_text())["submissions"][0]["sandbox"]
    assert sandbox[:2] == ["no landlock (switched off)", "no seccomp (switched off)"]
    assert _escapees() == []
    assert peak_mb < 1024


# ---- batches: resume, refusals, exit codes, shards -------------------------------------------------


def test_interrupted_batch_resumes_without_losing_or_duplicating_rows(tmp_path):
    subs = tmp_path / "subs"
    subs.mkdir()
    for i in range(3):
        _notebook(subs / f"00_s{i}.ipynb", IMPORTS, GOOD0 if i != 1 else WRONG0)
    out, lines = tmp_path / "grades.csv", []
    grade_batch([subs], out, limits=FAST, echo=lines.append, scratch_base=tmp_path)
    first = out.read_text()
    journal = grading.journal_path(out)
    kept = journal.read_text().splitlines()
    journal.write_text(kept[0] + "\n" + kept[1][:40])  # killed while writing the second entry
    out.unlink()
    lines.clear()
    grade_batch([subs], out, limits=FAST, echo=lines.append, scratch_base=tmp_path)
    assert "1 already graded" in lines[0] and "2 to grade" in lines[0]
    verdicts = lambda text: sorted(tuple(r[k] for k in ("submission", "exercise", "points", "status"))  # noqa: E731
                                   for r in csv.DictReader(text.splitlines()))
    assert verdicts(out.read_text()) == verdicts(first) and len(verdicts(first)) == 3
    lines.clear()
    _notebook(subs / "00_s1.ipynb", IMPORTS, GOOD0)  # a resubmission is graded again; the rest is not
    grade_batch([subs], out, limits=FAST, echo=lines.append, scratch_base=tmp_path)
    assert "2 already graded" in lines[0] and "1 to grade" in lines[0]
    assert [r["status"] for r in _rows(out).values()] == ["passed"] * 3


def test_shards_grade_disjoint_parts_and_merge_only_when_complete(tmp_path):
    from course_lib.grading import shards

    subs = tmp_path / "subs"
    subs.mkdir()
    for i in range(6):
        _notebook(subs / f"00_s{i}.ipynb", IMPORTS, GOOD0 if i % 3 else WRONG0)
    outs = [tmp_path / f"shard{k}.csv" for k in (1, 2, 3)]
    for k, out in enumerate(outs, 1):
        grade_batch([subs], out, tmp_path / f"shard{k}.json", limits=FAST, echo=lambda s: None, scratch_base=tmp_path,
                    shard=(k, 3))
    parts = [set(json.loads(shards.manifest_path(o).read_text())["assigned"]) for o in outs]
    assert sum(map(len, parts)) == 6 and not (parts[0] & parts[1] or parts[1] & parts[2] or parts[0] & parts[2])
    for bad, match in [(outs[:2], "missing"), (outs + [outs[0]], "given twice")]:
        with pytest.raises(ValueError, match=match):
            shards.merge(bad, tmp_path / "x.csv", echo=lambda s: None)
    totals = shards.merge(outs, tmp_path / "all.csv", tmp_path / "all.json", echo=lambda s: None)
    assert totals["submissions"] == 6 and totals["points"] == 4 and len(_rows(tmp_path / "all.csv")) == 6
    with pytest.raises(ValueError, match="exists"):
        shards.merge(outs, tmp_path / "all.csv", echo=lambda s: None)
    with pytest.raises(ValueError, match="one of the shards"):
        shards.merge(outs, outs[0], force=True, echo=lambda s: None)
    # a shard of another batch (a submission more), an edited CSV, an unfinished shard
    _notebook(subs / "00_late.ipynb", IMPORTS, GOOD0)
    other = tmp_path / "other.csv"
    grade_batch([subs], other, limits=FAST, echo=lambda s: None, scratch_base=tmp_path, shard=(1, 3))
    with pytest.raises(ValueError, match="another batch"):
        shards.merge([other, *outs[1:]], tmp_path / "y.csv", echo=lambda s: None)
    fullest = max(outs, key=lambda o: len(o.read_text().splitlines()))
    text = fullest.read_text().splitlines()
    assert len(text) > 1
    fullest.write_text("\n".join(text[:-1]) + "\n")
    with pytest.raises(ValueError, match="does not hold the submissions"):
        shards.merge(outs, tmp_path / "z.csv", echo=lambda s: None)
    fullest.write_text("\n".join(text) + "\n")
    manifest = json.loads(shards.manifest_path(outs[2]).read_text())
    shards.manifest_path(outs[2]).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match="did not grade all"):
        shards.merge(outs, tmp_path / "w.csv", echo=lambda s: None)
    with pytest.raises(ValueError, match="K/N"):
        shards.parse_shard("4/3")


def test_grade_refuses_to_overwrite_a_file_it_did_not_write(tmp_path):
    nb = _notebook(tmp_path / "00_a.ipynb", IMPORTS, GOOD0)
    out = tmp_path / "grades.csv"
    out.write_text("my own spreadsheet")
    with pytest.raises(ValueError, match="--force"):
        grade_batch([nb], out, limits=FAST, echo=lambda s: None)
    assert out.read_text() == "my own spreadsheet"
    with pytest.raises(ValueError, match="does not exist"):
        grade_batch([tmp_path / "missing"], tmp_path / "g.csv", limits=FAST)
    for bad in (0, float("inf"), -1):
        with pytest.raises(ValueError, match="positive finite"):
            Limits(timeout=bad)


def test_cli_grade_and_merge_exit_codes(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = lambda *a: subprocess.run([sys.executable, "-m", "course_lib", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, cwd=tmp_path, env=env)
    good = _notebook(tmp_path / "00_good.ipynb", IMPORTS, GOOD0)
    r = run("grade", good, "--out", tmp_path / "g.csv", "--cell-timeout", 10, "--memory-mb", 3072)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1/1 points" in r.stdout
    (tmp_path / "00_bad.ipynb").write_text("{")
    r = run("grade", good, tmp_path / "00_bad.ipynb", "--out", tmp_path / "g.csv", "--json", tmp_path / "g.json")
    assert r.returncode == 1 and "could not be graded" in r.stdout
    assert json.loads((tmp_path / "g.json").read_text())["totals"]["status"]["error"] == 1
    r = run("grade", tmp_path / "missing.ipynb", "--out", tmp_path / "x.csv")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = run("grade", good, "--out", tmp_path / "s.csv", "--shard", "3/2")
    assert r.returncode == 2 and "K/N" in r.stderr
    r = run("grade", good, "--out", tmp_path / "s1.csv", "--shard", "1/1")
    assert r.returncode == 0, r.stderr
    r = run("merge-grades", tmp_path / "s1.csv", "--out", tmp_path / "m.csv")
    assert r.returncode == 0 and "Merged 1 shard(s), 1 submission(s): 1/1 points" in r.stdout, r.stdout + r.stderr
    r = run("merge-grades", tmp_path / "g.csv", "--out", tmp_path / "m2.csv")
    assert r.returncode == 2 and "no shard manifest" in r.stderr
    chinese = _notebook(tmp_path / "00_作业.ipynb", IMPORTS, GOOD0)  # a terminal that cannot show the name
    r = subprocess.run([sys.executable, "-m", "course_lib", "grade", str(chinese), "--out", str(tmp_path / "c.csv")],
                       capture_output=True, cwd=tmp_path, env={**env, "PYTHONIOENCODING": "latin-1"})
    assert r.returncode == 0 and b"\\u4f5c" in r.stdout, r.stdout + r.stderr


def test_a_failure_of_the_grader_itself_is_an_error_row_and_is_retried(tmp_path, monkeypatch):
    nb = _notebook(tmp_path / "00_a.ipynb", IMPORTS, GOOD0)
    out = tmp_path / "grades.csv"

    def broken(*args, **kwargs):
        raise OSError("too many open files")

    monkeypatch.setattr(B, "grade_notebook", broken)
    records, totals = grade_batch([nb], out, limits=FAST, echo=lambda s: None)
    assert totals["status"]["error"] == 1 and "too many open files" in records[0]["rows"][0]["message"]
    assert "00_a.ipynb" in records[0]["rows"][0]["message"]  # the row names its submission
    monkeypatch.undo()
    lines = []
    records, totals = grade_batch([nb], out, limits=FAST, echo=lines.append)
    assert "1 to grade" in lines[0] and totals["status"] == {"passed": 1, "failed": 0, "not_attempted": 0,
                                                             "error": 0, "timeout": 0}


def test_csv_cells_cannot_become_spreadsheet_formulas():
    text = grading.csv_text([grading.make_row("=HYPERLINK(\"http://x\")", "q_sample", "failed", "-1 points?")])
    row = next(csv.DictReader(text.splitlines()))
    assert row["submission"].startswith("'=") and row["message"] == "'-1 points?" and row["exercise"] == "q_sample"
