"""Test-wide settings: quick mode for every notebook and test, and a headless matplotlib backend.

Set here, at import, so the Jupyter kernels and graders the tests start inherit them (and nbval's kernels, when the
lessons are run by hand with `python -m pytest --nbval-lax notebooks`).
"""
import os

os.environ["COURSE_QUICK"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter; it is chosen when a kernel is first
# compiled. With a GPU the kernel tests run compiled on it (tests/test_kernels.py picks the device).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The lessons are not collected by default (pyproject's testpaths is tests/): tests/test_grading.py runs every cell of
# every lesson and student copy through the batch grader. Run by hand with nbval, the student copies are skipped: they
# are the released form of the sources (tests/test_repo.py), and tests/test_browser.py runs one in JupyterLab.
collect_ignore = ["notebooks/student"]
