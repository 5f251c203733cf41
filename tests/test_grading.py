"""The batch grader: source lessons score full marks, student copies zero, and hostile submissions cannot
break the batch, change other rows, forge a verdict or touch files outside their scratch folders."""
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from course_lib import grading
from course_lib.exercises import EXERCISES
from course_lib.grading import Limits, definitions, grade_batch, lesson_of, read_cells

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
FAST = Limits(timeout=60, cell_timeout=3, call_timeout=2, grace=2, memory_mb=3072, threads=1)

IMPORTS = "import os, sys, signal, shutil, torch\nfrom course_lib import check, progress"
GOOD0 = "def noise_images(x, sigma, noise):\n    return x + sigma.view(-1, *[1] * (x.ndim - 1)) * noise"
WRONG0 = "def noise_images(x, sigma, noise):\n    return x + sigma.mean() * noise"
CHECK0 = 'check("noise_images", noise_images)'
GOOD1 = ["def alpha_bar_from_betas(betas):\n    return torch.cumprod(1 - betas, 0)",
         "def q_sample(x0, t, alpha_bar, noise):\n    ab = alpha_bar[t].view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)\n"
         "    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise",
         "def log_snr(alpha_bar):\n    return torch.log(alpha_bar / (1 - alpha_bar))"]


def _notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A submission")] + [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _rows(csv_path: Path) -> dict:
    with open(csv_path, newline="") as f:
        return {(Path(r["submission"]).name, r["exercise"]): r for r in csv.DictReader(f)}


# ---- reading submissions ---------------------------------------------------------------------------


def test_lesson_is_found_from_stamp_content_or_filename():
    cells = [(1, "def q_sample(x0, t, alpha_bar, noise):\n    pass"), (2, 'check("log_snr", log_snr)')]
    assert lesson_of(cells, {}, "anything.ipynb") == 1
    assert lesson_of([], {"course_lib": {"lesson": 3}}, "01_x.ipynb") == 3  # the release stamp wins
    assert lesson_of([], {}, "alice_04_diffusion.ipynb") == 4
    assert lesson_of([(1, "def ddim_step(): pass\ndef q_sample(): pass")], {}, "x.ipynb") is None  # two lessons
    assert lesson_of([], {"course_lib": {"lesson": 99}}, "notes.ipynb") is None


def test_definitions_see_defs_assignments_imports_and_survive_magics():
    cells = [(1, "%matplotlib inline\ndef q_sample(a):\n    !ls\n    return a"), (3, "log_snr = lambda a: a"),
             (4, "from course_lib.schedules import alpha_bar_from_betas"), (5, "def q_sample(:")]
    where = definitions(cells, ["q_sample", "log_snr", "alpha_bar_from_betas"])
    assert where == {"q_sample": [1, 5], "log_snr": [3], "alpha_bar_from_betas": [4]}


def test_read_cells_rejects_broken_files_with_a_reason():
    with pytest.raises(ValueError, match="not a readable notebook"):
        read_cells(b"{ not json")
    good = nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])).encode()
    assert read_cells(good)[0] == [(1, "x = 1")]
    with pytest.raises(ValueError, match="not a readable notebook"):
        read_cells(good[: len(good) // 2])


def test_committed_student_copies_carry_their_lesson():
    for p in sorted((NOTEBOOKS / "student").glob("*.ipynb")):
        assert nbformat.read(p, as_version=4).metadata["course_lib"]["lesson"] == int(p.name[:2])


# ---- the self-test: the real lessons --------------------------------------------------------------


def test_source_lessons_score_full_marks_and_student_copies_zero(tmp_path):
    """Grades every lesson and its student copy in one batch (2 jobs): the release round trip, graded."""
    out = tmp_path / "grades.csv"
    records, totals = grade_batch([NOTEBOOKS], out, tmp_path / "grades.json", jobs=2, echo=lambda s: None,
                                  scratch_base=tmp_path)
    lessons = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert len(records) == 2 * len(lessons)
    for rec in records:
        expected = sorted(n for n, ex in EXERCISES.items() if ex.lesson == rec["lesson"])
        assert sorted(r["exercise"] for r in rec["rows"]) == expected and expected, rec["submission"]
        student = "/student/" in rec["submission"].replace("\\", "/")
        want = "not_attempted" if student else "passed"
        assert all(r["status"] == want for r in rec["rows"]), rec["rows"]
        assert not rec["notes"], (rec["submission"], rec["notes"])  # every cell ran without an error
        assert rec["sandbox"][-1] == "audit hook"
    assert totals["points"] == totals["max_points"] / 2 and totals["status"]["error"] == 0
    saved = json.loads((tmp_path / "grades.json").read_text())
    with open(out, newline="") as f:
        assert saved["totals"] == totals and len(list(csv.DictReader(f))) == totals["status"]["passed"] * 2
    assert not list(tmp_path.glob("course-grade-*")), "scratch folders left behind"


# ---- hostile and broken submissions, one batch --------------------------------------------------

# name -> (cells, {exercise: expected status}, text the message must contain, flag)
CASES = {
    "00_good": ([IMPORTS, GOOD0, CHECK0], {"noise_images": "passed"}, "fresh random", ""),
    "00_wrong": ([IMPORTS, WRONG0, CHECK0], {"noise_images": "failed"}, "own sigma", ""),
    "00_nan": ([IMPORTS, "def noise_images(x, sigma, noise):\n    return x * float('nan')"],
               {"noise_images": "failed"}, "NaN", ""),
    "00_returns_none": ([IMPORTS, "def noise_images(x, sigma, noise):\n    y = x * 2"],
                        {"noise_images": "failed"}, "return", ""),
    "00_raises": ([IMPORTS, "def noise_images(x, sigma, noise):\n    raise KeyError('oops')"],
                  {"noise_images": "failed"}, "KeyError", ""),
    "00_cell_exception": ([IMPORTS, "raise RuntimeError('broken cell')", GOOD0], {"noise_images": "passed"}, "", ""),
    "00_syntax_error": ([IMPORTS, "def noise_images(x, sigma, noise)\n    return x"],
                        {"noise_images": "failed"}, "SyntaxError", ""),
    "00_infinite_loop": ([IMPORTS, GOOD0, "while True:\n    pass"], {"noise_images": "passed"}, "", ""),
    "00_loop_ignores_alarm": ([IMPORTS, GOOD0, "while True:\n    try:\n        while True:\n            pass\n"
                               "    except BaseException:\n        pass"], {"noise_images": "passed"}, "skipped", ""),
    "00_slow_function": ([IMPORTS, "def noise_images(x, sigma, noise):\n    while True:\n        pass"],
                         {"noise_images": "timeout"}, "did not return", ""),
    "00_sys_exit": ([IMPORTS, "sys.exit(3)", GOOD0], {"noise_images": "passed"}, "", ""),
    "00_os_exit": ([IMPORTS, GOOD0, "os._exit(0)"], {"noise_images": "passed"}, "ended the grading process", ""),
    "00_kills_itself": ([IMPORTS, "os.kill(os.getpid(), signal.SIGKILL)", GOOD0], {"noise_images": "passed"},
                        "signal 9", ""),
    "00_memory_blowup": ([IMPORTS, "hog = [bytearray(1 << 28) for _ in range(10_000)]", GOOD0],
                         {"noise_images": "passed"}, "", ""),
    "00_memory_in_function": ([IMPORTS, "def noise_images(x, sigma, noise):\n    return torch.empty(1 << 40)"],
                              {"noise_images": "failed"}, "RuntimeError", ""),
    "00_fork": ([IMPORTS, "pid = os.fork()\nif pid == 0:\n    while True: pass", GOOD0,
                 "import subprocess\nsubprocess.Popen(['sleep', '600'])"], {"noise_images": "passed"}, "", ""),
    "00_vandal": ([IMPORTS, "VICTIM", GOOD0], {"noise_images": "passed"}, "", ""),
    "00_forger": ([IMPORTS, WRONG0,
                   "import course_lib, course_lib.exercises as E\n"
                   "E.EXERCISES['noise_images'] = E.EXERCISES['noise_images'].__class__('noise_images', 0, "
                   "noise_images, E.EXERCISES['noise_images'].make_inputs, 'h')\n"
                   "E.judge = lambda *a, **k: None\ncourse_lib.check = check = lambda *a: print('passed') or True\n"
                   "print('noise_images: passed. 1/1 points')", CHECK0], {"noise_images": "failed"}, "own sigma", ""),
    "00_copies_reference": ([IMPORTS, "from course_lib.exercises import ref_noise_images\n"
                             "def noise_images(x, sigma, noise):\n    return ref_noise_images(x, sigma, noise)"],
                            {"noise_images": "failed"}, "course_lib.exercises.ref_noise_images", "library_reference"),
    "00_deleted_exercise": ([IMPORTS, "print('I removed the exercise')"], {"noise_images": "not_attempted"},
                            "deleted", ""),
    "00_duplicated_exercise": ([IMPORTS, WRONG0, CHECK0, GOOD0, CHECK0], {"noise_images": "passed"}, "cells 3, 5", ""),
    "00_not_a_function": ([IMPORTS, "noise_images = 3"], {"noise_images": "failed"}, "not a function", ""),
    "01_mixed": ([IMPORTS, GOOD1[0], "def q_sample(x0, t, alpha_bar, noise):\n    os._exit(1)", GOOD1[2]],
                 {"alpha_bar_from_betas": "passed", "q_sample": "failed", "log_snr": "passed"}, "", ""),
    "01_library": ([IMPORTS, "from course_lib.schedules import alpha_bar_from_betas", *GOOD1[1:]],
                   {"alpha_bar_from_betas": "failed", "q_sample": "passed", "log_snr": "passed"},
                   "", "library_reference"),
    "01_channel_garbage": ([IMPORTS, *GOOD1, "for fd in range(3, 64):\n    try:\n        os.write(fd, b'x' * 64)\n"
                            "    except OSError:\n        pass"], {n: "passed" for n in
                                                                  ("alpha_bar_from_betas", "q_sample", "log_snr")},
                           "corrupted the grader's channel", ""),
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
            "            lambda: open(course_lib.exercises.__file__, 'a').write('# pwned'),\n"
            "            lambda: os.kill(os.getppid(), signal.SIGKILL)]\n"
            "for attempt in attempts:\n    try:\n        attempt()\n        print('DAMAGE DONE')\n"
            "    except Exception as e:\n        print('refused:', e)\n"
            "open('mine.txt', 'w').write('scratch is writable')")


def test_hostile_batch(tmp_path):
    subs, victim, scratch = tmp_path / "subs", tmp_path / "instructor", tmp_path / "scratch"
    for d in (subs, victim, scratch):
        d.mkdir()
    (victim / "keep.txt").write_text("the instructor's file")
    out = victim / "grades.csv"
    for name, (cells, *_rest) in CASES.items():
        _notebook(subs / f"{name}.ipynb", *[_vandal_cell(victim, out) if c == "VICTIM" else c for c in cells])
    good = nbformat.writes(nbformat.read(subs / "00_good.ipynb", as_version=4))
    (subs / "00_malformed.ipynb").write_text("{ this is not json")
    (subs / "00_truncated.ipynb").write_text(good[: len(good) // 2])
    (subs / "notes.ipynb").write_text(nbformat.writes(nbformat.v4.new_notebook()))  # no lesson to be found
    before = _snapshot(victim) | {"course_lib": hashlib.sha256(Path(grading.__file__).with_name("exercises.py")
                                                               .read_bytes()).hexdigest()}

    records, totals = grade_batch([subs], out, victim / "grades.json", limits=FAST, jobs=2, echo=lambda s: None,
                                  scratch_base=scratch)

    rows = _rows(out)
    for name, (_, expected, fragment, flag) in CASES.items():
        for exercise, status in expected.items():
            row = rows[(f"{name}.ipynb", exercise)]
            assert row["status"] == status, (name, row)
            assert int(row["points"]) == (status == "passed") == (row["points"] == row["max_points"]), (name, row)
        texts = " ".join(rows[(f"{name}.ipynb", e)]["message"] for e in expected)
        assert fragment in texts, (name, texts)
        assert flag in {rows[(f"{name}.ipynb", e)]["flag"] for e in expected}, (name, rows)
    for broken in ("00_malformed", "00_truncated"):
        assert rows[(f"{broken}.ipynb", "noise_images")]["status"] == "error"
        assert "not a readable notebook" in rows[(f"{broken}.ipynb", "noise_images")]["message"]
    assert rows[("notes.ipynb", grading.WHOLE_NOTEBOOK)]["status"] == "error"
    n_rows = sum(len(e) for _, e, _, _ in CASES.values()) + 3
    assert len(rows) == n_rows == sum(totals["status"].values())  # one row each, none duplicated
    assert set(totals["ungradable"]) == {str(subs / f"{n}.ipynb") for n in
                                         ("00_malformed", "00_truncated", "notes")}
    # nothing outside the scratch folders changed, and the scratch folders are gone
    after = _snapshot(victim) | {"course_lib": hashlib.sha256(Path(grading.__file__).with_name("exercises.py")
                                                              .read_bytes()).hexdigest()}
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= {"grades.csv", "grades.csv.journal", "grades.json"}, changed
    assert (victim / "keep.txt").read_text() == "the instructor's file"
    assert list(scratch.iterdir()) == []
    vandal = next(r for r in records if r["submission"].endswith("00_vandal.ipynb"))
    assert vandal["sandbox"][-1] == "audit hook"
    # the 'os._exit' and 'SIGKILL' notebooks were graded with the killing cell skipped, after a retry
    exits = next(r for r in records if r["submission"].endswith("00_os_exit.ipynb"))
    assert any("cell 4 was skipped" in n for n in exits["notes"])


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
    verdicts = lambda text: sorted(tuple(r[k] for k in ("submission", "exercise", "points", "status"))
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
    run = lambda *a: subprocess.run([sys.executable, "-m", "course_lib", "grade", *map(str, a)],
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


def test_a_failure_of_the_grader_itself_is_an_error_row_and_is_retried(tmp_path, monkeypatch):
    nb = _notebook(tmp_path / "00_a.ipynb", IMPORTS, GOOD0)
    out = tmp_path / "grades.csv"

    def broken(*args, **kwargs):
        raise OSError("too many open files")

    monkeypatch.setattr(grading, "grade_notebook", broken)
    records, totals = grade_batch([nb], out, limits=FAST, echo=lambda s: None)
    assert totals["status"]["error"] == 1 and "too many open files" in records[0]["rows"][0]["message"]
    monkeypatch.undo()
    lines = []
    records, totals = grade_batch([nb], out, limits=FAST, echo=lines.append)
    assert "1 to grade" in lines[0] and totals["status"] == {"passed": 1, "failed": 0, "not_attempted": 0,
                                                             "error": 0, "timeout": 0}


def test_csv_cells_cannot_become_spreadsheet_formulas():
    text = grading._csv_text([grading._row("=HYPERLINK(\"http://x\")", "q_sample", "failed", "-1 points?")])
    row = next(csv.DictReader(text.splitlines()))
    assert row["submission"].startswith("'=") and row["message"] == "'-1 points?" and row["exercise"] == "q_sample"
