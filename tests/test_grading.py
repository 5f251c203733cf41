"""The batch grader: source lessons score full marks, student copies zero, and hostile submissions cannot break the
batch, forge or copy a grade, outlive their grading, reach the network or read what is not theirs."""
import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from course_lib import grading
from course_lib.grading import Limits, channel, definitions, grade_batch, identity, lesson_of, read_cells, scan
from course_lib.grading import batch as B

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
FAST = Limits(timeout=150, cell_timeout=6, call_timeout=4, grace=10, memory_mb=3072, threads=1)  # generous: a busy machine
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
    assert lesson_of([], {"course_lib": {"lesson": 99}}, "notes.ipynb") is None
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
    many = json.dumps({"cells": [{"cell_type": "code", "source": ""}] * (B.MAX_CELLS + 1)}).encode()
    with pytest.raises(ValueError, match="cells"):
        read_cells(many)


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


def test_fingerprints_see_a_copied_function_under_any_name_but_not_an_honest_rewrite():
    import inspect
    import types

    from course_lib import schedules

    lib = schedules.alpha_bar_from_betas
    clone = types.FunctionType(lib.__code__.replace(co_name="mine", co_filename="x.py", co_firstlineno=7), {})
    ns = dict(vars(schedules))
    exec(compile(inspect.getsource(lib).replace("def alpha_bar_from_betas", "def mine"), "<cell>", "exec"), ns)

    def honest(betas):
        return torch.cumprod(1 - betas, 0)

    want = identity.fingerprint(lib.__code__)
    assert identity.fingerprint(clone.__code__) == identity.fingerprint(ns["mine"].__code__) == want
    assert identity.fingerprint(honest.__code__) != want
    library, refs = B.answer_fingerprints()
    assert want in library["alpha_bar_from_betas"] and library["alpha_bar_from_betas"][want].endswith("alpha_bar_from_betas")

    def wrapper(betas):
        return lib(betas)

    codes, evidence = identity.reach(wrapper)
    assert want in {identity.fingerprint(c) for c in codes} and not evidence
    traced = torch.jit.trace(lib, torch.rand(5, dtype=torch.float64) * 0.1)
    assert any("TorchScript" in e for e in identity.reach(lambda b: traced(b))[1])


def test_the_source_scan_reads_changed_cells_only_and_follows_the_graded_function():
    lesson = {scan.normalize("import torch\nfrom course_lib import schedules"),
              scan.normalize("import inspect\nprint(inspect.getsource(schedules.q_sample))")}
    cells = [(1, "import torch\nfrom course_lib import schedules"),
             (2, "import inspect\nprint(inspect.getsource(schedules.q_sample))"),  # the lesson's own: trusted
             (3, "lib = schedules.alpha_bar_from_betas\ndef helper(b):\n    return lib(b)"),
             (4, "def alpha_bar_from_betas(betas):\n    return helper(betas)"),
             (5, "def log_snr(alpha_bar):\n    return torch.log(alpha_bar / (1 - alpha_bar))\n"
                 "assert torch.allclose(log_snr(ab), schedules.log_snr_from_alpha_bar(ab))"),  # a self-check
             (6, "%run evil.py\nx = getattr(torch, 'lo' + 'ad')\nsignal.signal(14, print)\nclass T(torch.Tensor): pass")]
    graded = {"alpha_bar_from_betas": {"course_lib.schedules.alpha_bar_from_betas"},
              "log_snr": {"course_lib.schedules.log_snr_from_alpha_bar"}}
    tamper, copy = scan.scan(cells, lesson, graded, {"ref_q_sample"})
    what = {f.what for f in tamper}
    assert {"uses the magic %run", "calls getattr() with a computed attribute name", "uses signal.signal",
            "defines a torch.Tensor subclass"} <= what
    assert not any("inspect" in w for w in what)  # the lesson itself uses inspect
    assert [f.what for f in copy["alpha_bar_from_betas"]] == [
        "uses course_lib's alpha_bar_from_betas, which computes this answer"]
    assert copy["log_snr"] == []  # the library is only used to check the learner's answer, not to compute it
    threads = scan.scan([(1, "import threading, subprocess, socket")], set(), {}, set())[0]
    assert threads == []  # refused by the sandbox at run time, and unable to change a grade: not flagged


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
    "00_kills_itself": ([IMPORTS, "os.kill(os.getpid(), signal.SIGKILL)", GOOD0], {"noise_images": P}, "signal 9", ""),
    "00_memory_blowup": ([IMPORTS, "hog = [bytearray(1 << 28) for _ in range(10_000)]", GOOD0], {"noise_images": P},
                         "", ""),
    "00_memory_in_function": ([IMPORTS, "def noise_images(x, sigma, noise):\n    return torch.empty(1 << 40)"],
                              {"noise_images": F}, "RuntimeError", ""),
    "00_fork": ([IMPORTS, "pid = os.fork()\nif pid == 0:\n    while True: pass", GOOD0,
                 "import subprocess\nsubprocess.Popen(['sleep', '600'])"], {"noise_images": P}, "", ""),
    "00_vandal": ([IMPORTS, "VICTIM", GOOD0], {"noise_images": P}, "", ""),
    "00_forger": ([IMPORTS, WRONG0, "import course_lib, course_lib.exercises as E\n"
                   "E.judge = lambda *a, **k: None\ncourse_lib.check = check = lambda *a: print('passed') or True\n"
                   "print('noise_images: passed. 1/1 points')", CHECK0], {"noise_images": F}, "own sigma", "tampered"),
    "00_replaces_code": ([IMPORTS, GOOD0, "def other(x, sigma, noise):\n    return x\n"
                          "noise_images.__code__ = other.__code__"], {"noise_images": F},
                         "replacing a function's __code__", "tampered"),
    "00_code_by_wrapper": ([IMPORTS, GOOD0, "import functools\ndef other(x, sigma, noise):\n    return x\n"
                            "functools.update_wrapper(noise_images, other, assigned=('__code__',))"],
                           {"noise_images": F}, "replacing a function's __code__", "tampered"),
    # the one __code__ change allowed: @types.coroutine's flag (trio does it when diffusers is imported)
    "00_types_coroutine": ([IMPORTS, "import types\n@types.coroutine\ndef waits():\n    yield", GOOD0],
                           {"noise_images": P}, "", ""),
    "00_copies_reference": ([IMPORTS, "from course_lib.exercises import ref_noise_images\n"
                             "def noise_images(x, sigma, noise):\n    return ref_noise_images(x, sigma, noise)"],
                            {"noise_images": F}, "exercise references", "library_reference"),
    "00_deleted_exercise": ([IMPORTS, "print('I removed the exercise')"], {"noise_images": N}, "deleted", ""),
    "00_duplicated_exercise": ([IMPORTS, WRONG0, CHECK0, GOOD0, CHECK0], {"noise_images": P}, "cells 3, 5", ""),
    "00_not_a_function": ([IMPORTS, "noise_images = 3"], {"noise_images": F}, "not a function", ""),
    "01_mixed": ([IMPORTS, GOOD1[0], "def q_sample(x0, t, alpha_bar, noise):\n    os._exit(1)", GOOD1[2]],
                 {"alpha_bar_from_betas": P, "q_sample": F, "log_snr": P}, "", ""),
    "01_library": ([IMPORTS, "from course_lib.schedules import alpha_bar_from_betas", *GOOD1[1:]],
                   {"alpha_bar_from_betas": F, "q_sample": P, "log_snr": P}, "computes this answer", "library_reference"),
    # 1. one bad submission must not cost the others their rows
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
    # 2. points without writing the code
    "01_bytecode_clone": ([IMPORTS, LIB, "import types\nf = schedules.alpha_bar_from_betas\n"
                           "alpha_bar_from_betas = types.FunctionType(f.__code__.replace(co_name='mine'), f.__globals__)",
                           *GOOD1[1:]], {"alpha_bar_from_betas": F, "q_sample": F, "log_snr": F}, "__code__",
                          "library_reference"),
    "01_source_reexec": ([IMPORTS, LIB, "import inspect\nns = dict(vars(schedules))\n"
                          "exec(inspect.getsource(schedules.alpha_bar_from_betas).replace('def alpha_bar_from_betas', 'def mine'), ns)\n"
                          "alpha_bar_from_betas = ns['mine']", *GOOD1[1:]],
                         {"alpha_bar_from_betas": F, "q_sample": F, "log_snr": F}, "contains the code of",
                         "library_reference"),
    "01_module_file_reexec": ([IMPORTS, LIB, "import ast\ntree = ast.parse(open(schedules.__file__).read())\n"
                               "fn = [n for n in tree.body if getattr(n, 'name', '') == 'alpha_bar_from_betas'][0]\n"
                               "fn.name = 'mine'\nns = dict(vars(schedules))\n"
                               "exec(compile(ast.Module([fn], []), 'x', 'exec'), ns)\nalpha_bar_from_betas = ns['mine']",
                               *GOOD1[1:]], {"alpha_bar_from_betas": F, "q_sample": F, "log_snr": F},
                              "contains the code of", "library_reference"),
    "01_thread": ([IMPORTS, LIB, "import threading\ndef alpha_bar_from_betas(betas):\n    out = []\n"
                   "    t = threading.Thread(target=lambda: out.append(schedules.alpha_bar_from_betas(betas)))\n"
                   "    t.start(); t.join()\n    return out[0]", *GOOD1[1:]],
                  {"alpha_bar_from_betas": F, "q_sample": P, "log_snr": P}, "computes this answer", "library_reference"),
    "01_profiler_off": ([IMPORTS, LIB, "lib = schedules.alpha_bar_from_betas\ndef alpha_bar_from_betas(betas):\n"
                         "    p = sys.getprofile()\n    sys.setprofile(None)\n    try:\n        return lib(betas)\n"
                         "    finally:\n        sys.setprofile(p)", *GOOD1[1:]],
                        {"alpha_bar_from_betas": F, "q_sample": F, "log_snr": F}, "sys.setprofile", "library_reference"),
    "01_jit_trace": ([IMPORTS, LIB, "traced = torch.jit.trace(schedules.alpha_bar_from_betas, "
                      "torch.rand(9, dtype=torch.float64) * 0.1)\ndef alpha_bar_from_betas(betas):\n"
                      "    return traced(betas)", *GOOD1[1:]],
                     {"alpha_bar_from_betas": F, "q_sample": P, "log_snr": P}, "torch.jit", "library_reference"),
    "01_hidden_name": ([IMPORTS, LIB, "name = 'alpha_bar_' + 'from_betas'\ndef alpha_bar_from_betas(betas):\n"
                        "    return getattr(schedules, name)(betas)", *GOOD1[1:]],
                       {"alpha_bar_from_betas": F, "q_sample": F, "log_snr": F}, "while graded", "library_reference"),
    "01_lazy_subclass": ([IMPORTS, LIB, "class Lazy(torch.Tensor):\n    @classmethod\n"
                          "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
                          "        with torch._C.DisableTorchFunctionSubclass():\n"
                          "            return schedules.alpha_bar_from_betas(args[0].as_subclass(torch.Tensor))\n"
                          "def alpha_bar_from_betas(betas):\n    return betas.as_subclass(Lazy)", *GOOD1[1:]],
                         {"alpha_bar_from_betas": F, "q_sample": F, "log_snr": F}, "subclass", "library_reference"),
    "01_reads_solutions": ([IMPORTS, f"src = open({str(NOTEBOOKS / '01_forward_process.ipynb')!r}).read()", *GOOD1],
                           {n: P for n in ALL1}, "", ""),
    "01_reads_references": ([IMPORTS, f"src = open({str(ROOT / 'course_lib' / 'exercises' / 'lesson01.py')!r}).read()",
                             f"names = os.listdir({str(ROOT / 'course_lib' / 'exercises')!r})", *GOOD1],
                            {n: P for n in ALL1}, "", ""),
    "01_imports_references": ([IMPORTS, "import importlib\nE = importlib.import_module('course_lib.exercises')\n"
                               "alpha_bar_from_betas = E.ref_alpha_bar_from_betas", *GOOD1[1:]],
                              {"alpha_bar_from_betas": F, "q_sample": F, "log_snr": F}, "exercise references",
                              "library_reference"),
    "01_forges_the_channel": ([IMPORTS, "def alpha_bar_from_betas(betas):\n    return betas * 0", *GOOD1[1:],
                               "FORGE"], {"alpha_bar_from_betas": F, "q_sample": F, "log_snr": F}, "os.write",
                              "tampered"),
    # 4. processes and the network
    "00_setsid_child": ([IMPORTS, SPAWN, GOOD0], {"noise_images": P}, "", ""),
    "00_udp": ([IMPORTS, "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "s.sendto(b'leak', ('127.0.0.1', UDP_PORT))", "import _socket\n"
                "_socket.socket(2, 2).sendto(b'leak', ('127.0.0.1', UDP_PORT))", GOOD0], {"noise_images": P}, "", ""),
    "00_unix_socket": ([IMPORTS, "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(UNIX_PATH)\n"
                        "s.sendall(b'leak')", GOOD0], {"noise_images": P}, "", ""),
    # 5. privacy
    "00_snoop": ([IMPORTS, "SNOOP", GOOD0], {"noise_images": P}, "", ""),
    "00_imports_what_it_wrote": ([IMPORTS, "open('helper.py', 'w').write('def noise_images(x, sigma, noise):\\n'\n"
                                  "'    return x + sigma.view(-1, *[1] * (x.ndim - 1)) * noise\\n')",
                                  "from helper import noise_images"], {"noise_images": F}, "ModuleNotFoundError", ""),
}


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
    """Write a well-formed 'result' frame claiming correct answers, and a 'done', to every file descriptor."""
    return ("from course_lib.grading import channel\nimport torch\n"
            "forged = channel.encode({'kind': 'result', 'name': 'alpha_bar_from_betas', 'outputs': [torch.zeros(3)] * 5,"
            " 'library': [], 'fingerprints': [], 'evidence': [], 'subclass': False, 'refused': []})\n"
            "done = channel.encode({'kind': 'done', 'refused': []})\n"
            "for fd in range(3, 256):\n    try:\n        os.write(fd, forged + done)\n    except OSError:\n        pass")


def _write_cases(subs: Path, victim: Path, out: Path, scratch: Path, udp_port: int, unix_path: str) -> None:
    special = {"VICTIM": _vandal_cell(victim, out), "SNOOP": _snoop_cell(subs, out, scratch), "FORGE": _forge_cell()}
    for name, (cells, *_rest) in CASES.items():
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


BROKEN = {"00_malformed.ipynb": "not a readable notebook", "00_truncated.ipynb": "not a readable notebook",
          "00_fifo.ipynb": "FIFO", "00_zero.ipynb": "outside the given folders", "00_folder.ipynb": "a folder",
          "00_huge.ipynb": "over the limit"}


def _grade_in_subprocess(subs, out, json_out, scratch, limits: Limits, env_extra=None) -> int:
    """Run grade_batch in a fresh process (as the CLI would) and return that process's peak resident memory in MB."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would include the pytest process's size
    script = ("from course_lib.grading import Limits, grade_batch\n"
              f"grade_batch([{str(subs)!r}], {str(out)!r}, {str(json_out)!r}, limits=Limits(**{limits.__dict__!r}), "
              f"jobs=2, echo=lambda s: None, scratch_base={str(scratch)!r})\n"
              "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])")
    env = {**os.environ, "GRADER_SECRET": "GRADER_SECRET-do-not-leak", **(env_extra or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
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
    for name, (_, expected, fragment, flag) in CASES.items():
        for exercise, status in expected.items():
            row = rows[(f"{name}.ipynb", exercise)]
            assert row["status"] == status, (name, row)
            assert int(row["points"]) == (status == "passed") == (row["points"] == row["max_points"]), (name, row)
            assert len(row["message"]) <= B.MAX_MESSAGE_TEXT, (name, len(row["message"]))
        texts = " ".join(rows[(f"{name}.ipynb", e)]["message"] for e in expected)
        assert fragment in texts, (name, texts)
        flags = {rows[(f"{name}.ipynb", e)]["flag"] for e in expected}
        assert flag in flags and (flag or flags == {""}), (name, flags)
    for broken, why in BROKEN.items():
        row = rows[(broken, "noise_images")]
        assert row["status"] == "error" and why in row["message"] and broken in row["message"], (broken, row)
    assert rows[("notes.ipynb", grading.WHOLE_NOTEBOOK)]["status"] == "error"
    assert rows[("00_name_\\xff\\xfe.ipynb", "noise_images")]["status"] == "passed"
    n_rows = sum(len(e) for _, e, _, _ in CASES.values()) + len(BROKEN) + 2
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
    assert "reading" in refused("01_reads_solutions") and "course_lib/exercises" in refused("01_imports_references")
    assert "importing course_lib.exercises" in refused("00_forger")
    # the references are a package: its every file (and a bytecode cache beside them) is out of reach
    assert "reading" in refused("01_reads_references") and "listing" in refused("01_reads_references")
    snoop = records["00_snoop.ipynb"]
    assert not snoop["notes"], snoop["notes"]  # no read succeeded (the cell would have raised)
    assert "starting threads" in refused("01_thread") and "threads" in rows[("01_thread.ipynb",
                                                                                "alpha_bar_from_betas")]["message"]
    exits = records["00_os_exit.ipynb"]
    assert any("cell 4 was skipped" in n for n in exits["notes"])
    assert all(r["sandbox"][-1] == "audit hook" for r in saved["submissions"] if r["sandbox"])
    # no process outlived its grading, nothing reached the network, and the grader stayed small
    assert _escapees() == []
    with pytest.raises(BlockingIOError):
        udp.recv(100)
    with pytest.raises(BlockingIOError):
        unix.accept()
    assert peak_mb < 1024, f"the grader's peak memory was {peak_mb} MB"


FALLBACK = {
    "00_good": ([IMPORTS, GOOD0], {"noise_images": P}, ""),
    "00_setsid_child": ([IMPORTS, SPAWN, GOOD0], {"noise_images": P}, ""),
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


# ---- batches: resume, refusals, exit codes --------------------------------------------------------


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


def test_grade_refuses_to_overwrite_a_file_it_did_not_write(tmp_path):
    nb = _notebook(tmp_path / "00_a.ipynb", IMPORTS, GOOD0)
    out = tmp_path / "grades.csv"
    out.write_text("my own spreadsheet")
    with pytest.raises(ValueError, match="--force"):
        grade_batch([nb], out, limits=FAST, echo=lambda s: None)
    assert out.read_text() == "my own spreadsheet"
    with pytest.raises(ValueError, match="does not exist"):
        grade_batch([tmp_path / "missing"], tmp_path / "g.csv", limits=FAST)
    with pytest.raises(ValueError, match="must be positive"):
        Limits(timeout=0)


def test_cli_grade_exit_codes(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = lambda *a: subprocess.run([sys.executable, "-m", "course_lib", "grade", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, cwd=tmp_path, env=env)
    good = _notebook(tmp_path / "00_good.ipynb", IMPORTS, GOOD0)
    r = run(good, "--out", tmp_path / "g.csv", "--cell-timeout", 10, "--memory-mb", 3072)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1/1 points" in r.stdout
    (tmp_path / "00_bad.ipynb").write_text("{")
    r = run(good, tmp_path / "00_bad.ipynb", "--out", tmp_path / "g.csv", "--json", tmp_path / "g.json")
    assert r.returncode == 1 and "could not be graded" in r.stdout
    assert json.loads((tmp_path / "g.json").read_text())["totals"]["status"]["error"] == 1
    r = run(tmp_path / "missing.ipynb", "--out", tmp_path / "x.csv")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
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
    text = grading._csv_text([grading._row("=HYPERLINK(\"http://x\")", "q_sample", "failed", "-1 points?")])
    row = next(csv.DictReader(text.splitlines()))
    assert row["submission"].startswith("'=") and row["message"] == "'-1 points?" and row["exercise"] == "q_sample"


def test_answer_fingerprints_from_four_threads_at_once_in_a_fresh_process():
    """--jobs grades in threads; the first computation imports library modules (course_lib.autoencoder ...), which
    raced into 'partially initialized module' errors before it was done under a lock."""
    script = ("import threading\nfrom course_lib.grading import batch\nerrors = []\n"
              "def run():\n    try:\n        batch.answer_fingerprints()\n    except Exception as e:\n"
              "        errors.append(repr(e))\n"
              "threads = [threading.Thread(target=run) for _ in range(4)]\n"
              "[t.start() for t in threads]\n[t.join() for t in threads]\nprint(errors)")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])
