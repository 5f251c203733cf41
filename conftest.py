"""Test-wide settings: quick mode for every notebook and test, and a headless matplotlib backend.

Set here, at import, so the Jupyter kernels that nbval starts inherit them.
"""
import os

os.environ["COURSE_QUICK"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter; it is chosen when a kernel is first
# compiled. With a GPU the kernel tests run compiled on it (tests/test_kernels.py picks the device).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The student copies are not executed a second time by nbval: tests/test_grading.py runs every cell of every one of
# them through the batch grader (no cell may raise; every exercise reads 'not attempted') and tests/test_browser.py
# runs one in JupyterLab; tests/test_repo.py checks they are the released form of the sources.
collect_ignore = ["notebooks/student"]
