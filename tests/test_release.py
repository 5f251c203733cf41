import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from course_lib.grading.release import CODE_STUB, release, strip_solutions, student_notebook

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
                                  outputs=[nbformat.v4.new_output("stream", text="hi")], execution_count=3,
                                  metadata={"execution": {"iopub.status.busy": "2026-12-01T14:44:02Z"}, "tags": ["x"]}),
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
    assert "execution" not in code.metadata and code.metadata["tags"] == ["x"]  # timings go, tags stay
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


def test_check_and_progress_in_a_real_kernel(tmp_path):
    """What a learner sees in JupyterLab: check prints a verdict without raising; progress(lesson) prints the total."""
    import nbclient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in (
        "import torch\nfrom course_lib import check, progress",
        "def log_snr(alpha_bar):\n    return torch.log(alpha_bar / (1 - alpha_bar))\ncheck('log_snr', log_snr)",
        "def q_sample(x0, t, alpha_bar, noise):\n    raise NotImplementedError\ncheck('q_sample', q_sample)",
        "check('alpha_bar_from_betas', lambda betas: torch.cumsum(1 - betas, 0))",
        "progress(1)")]
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = ["".join(o.get("text", "") for o in c.outputs if o.output_type == "stream") for c in nb.cells]
    assert "log_snr: passed ✅" in text[1] and "q_sample: not attempted ⬜" in text[2]
    assert "alpha_bar_from_betas: failed ❌" in text[3] and "Hint: Use a running product" in text[3]
    assert "Total for lesson 1: 1 / 3 points" in text[4] and "grade my-work" in text[4]
    assert all(o.output_type != "error" for c in nb.cells for o in c.outputs)
