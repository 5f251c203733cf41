import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from course_lib.release import CODE_STUB, release, strip_solutions, student_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def test_strip_keeps_indentation_and_counts_regions():
    src = ("def f(x):\n    '''doc'''\n    ### BEGIN SOLUTION\n    y = x + 1\n    return y\n    ### END SOLUTION\n"
           "\n### BEGIN SOLUTION\nz = 3\n### END SOLUTION\nprint(z)")
    out, n = strip_solutions(src)
    assert n == 2
    assert out.splitlines() == ["def f(x):", "    '''doc'''", "    " + CODE_STUB[0], "    " + CODE_STUB[1], "",
                                CODE_STUB[0], CODE_STUB[1], "print(z)"]
    assert strip_solutions("x = 1") == ("x = 1", 0)


@pytest.mark.parametrize("bad, match", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another"),
])
def test_strip_rejects_broken_markers(bad, match):
    with pytest.raises(ValueError, match=match):
        strip_solutions(bad)


def _toy_notebook():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Title"),
        nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 42\n    ### END SOLUTION",
                                  outputs=[nbformat.v4.new_output("stream", text="hi")], execution_count=3),
        nbformat.v4.new_code_cell("assert f() == 42", metadata={"tags": ["hidden-tests"]}),
    ]
    return nb


def test_student_notebook_strips_solutions_hidden_tests_and_outputs():
    nb, report = student_notebook(_toy_notebook(), "toy.ipynb")
    assert (report.solutions, report.hidden_cells, report.outputs_cleared) == (1, 1, 1)
    assert len(nb.cells) == 2
    code = nb.cells[1]
    assert "42" not in code.source and "NotImplementedError" in code.source
    assert code.outputs == [] and code.execution_count is None
    nbformat.validate(nb)


def test_release_refuses_to_overwrite_without_force(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    nbformat.write(_toy_notebook(), src / "a.ipynb")
    assert len(release(src, out)) == 1
    mine = out / "my_notes.txt"
    mine.write_text("keep me")
    with pytest.raises(ValueError, match="not empty.*--force"):
        release(src, out)
    release(src, out, force=True)
    assert mine.read_text() == "keep me"  # force overwrites student notebooks only
    with pytest.raises(ValueError, match="differ"):
        release(src, src, force=True)
    (src / "broken.ipynb").write_text("{ not json")
    with pytest.raises(ValueError, match="broken.ipynb"):
        release(src, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()  # nothing half-released


def test_cli_release_exit_codes(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "course_lib", *a], capture_output=True, text=True)
    r = run("release", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = run("release", "--help")
    assert r.returncode == 0 and "SRC_DIR" in r.stdout
    r = run("frobnicate")
    assert r.returncode != 0


def _cells(path):
    nb = nbformat.read(path, as_version=4)
    return [(c.cell_type, c.source) for c in nb.cells]


def test_committed_student_copies_match_their_sources(tmp_path):
    """Fails when a source notebook changed and `python -m course_lib release notebooks notebooks/student --force` was not rerun."""
    sources = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert sources, "no lesson notebooks found"
    release(NOTEBOOKS, tmp_path)
    committed = sorted(p.name for p in (NOTEBOOKS / "student").glob("*.ipynb"))
    assert committed == [p.name for p in sources]
    for p in sources:
        fresh, kept = _cells(tmp_path / p.name), _cells(NOTEBOOKS / "student" / p.name)
        assert fresh == kept, f"notebooks/student/{p.name} is out of date: rerun the release command"


def test_every_source_lesson_has_exercises_and_students_see_no_solution():
    for p in sorted(NOTEBOOKS.glob("*.ipynb")):
        text = p.read_text()
        assert "### BEGIN SOLUTION" in text, f"{p.name} has no exercise"
        student = (NOTEBOOKS / "student" / p.name).read_text()
        assert "BEGIN SOLUTION" not in student and "NotImplementedError" in student
        nb = json.loads(student)
        assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")


def _check_outputs(path):
    """Execute a notebook in quick mode and return the printed output of every `check(...)` cell."""
    import nbclient

    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    return [("".join(o.get("text", "") for o in c.outputs if o.output_type == "stream"))
            for c in nb.cells if c.cell_type == "code" and c.source.lstrip().startswith("check(")]


@pytest.mark.parametrize("name", [p.name for p in sorted(NOTEBOOKS.glob("*.ipynb"))])
def test_release_round_trip(name):
    """Source lessons pass every check; their student copies run cleanly with every exercise not attempted."""
    from course_lib.exercises import EXERCISES

    lesson = int(name[:2])
    expected = sorted(n for n, ex in EXERCISES.items() if ex.lesson == lesson)
    source = _check_outputs(NOTEBOOKS / name)
    student = _check_outputs(NOTEBOOKS / "student" / name)
    assert len(source) == len(student) == len(expected) > 0
    assert sorted(out.split(":")[0].split()[-1] for out in source) == expected
    assert all(": passed." in out for out in source), source
    assert all(": not attempted." in out for out in student), student
