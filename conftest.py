"""Test-wide settings: quick mode for every notebook and test, and a headless matplotlib backend.

Set here, at import, so the Jupyter kernels that nbval starts inherit them.
"""
import os

os.environ["COURSE_QUICK"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
# Triton kernels run on CPU tensors in Triton's interpreter; it is chosen when a kernel is first compiled.
os.environ.setdefault("TRITON_INTERPRET", "1")
