"""Test-wide settings: quick mode for every notebook and test, and a headless matplotlib backend.

Set here, at import, so the Jupyter kernels and graders the tests start inherit them (and nbval's kernels, when the
lessons are run by hand with `python -m pytest --nbval-lax notebooks`).
"""
import os

os.environ["COURSE_QUICK"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter; it is chosen when a kernel is first
# compiled. With a GPU the kernel tests run compiled on it (tests/test_kernels.py picks the device).
import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist (pyproject's addopts: `-n auto --dist loadfile`) runs the test files on several workers, each file's
# tests in order on one worker. The cores are shared out so that workers do not oversubscribe them: each worker's
# torch, and the kernels and graders it starts, get cores / workers threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads
    torch.set_num_threads(int(_threads))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: ignored where it is not installed
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (more would each start their own kernels and graders for little
    gain on this suite, whose longest file takes a few minutes)."""
    return max(1, min(4, os.cpu_count() or 1))

# The lessons are not collected by default (pyproject's testpaths is tests/): tests/test_lessons_graded.py runs every cell of
# every lesson and student copy through the batch grader. Run by hand with nbval, the student copies are skipped: they
# are the released form of the sources (tests/test_repo.py), and tests/test_browser.py runs one in JupyterLab.
collect_ignore = ["notebooks/student"]


FIRST = "test_lessons_graded.py"  # the longest file (every lesson, executed twice): started first, the rest beside it


def pytest_collection_modifyitems(config, items):
    """Run the lesson batch first (each xdist worker collects the same order; loadfile hands out files in it)."""
    items.sort(key=lambda item: item.path.name != FIRST)  # a stable sort: every other file keeps its order
