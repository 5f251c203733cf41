"""Test-wide settings: quick mode for every notebook and test, and a headless matplotlib backend.

Set here, at import, so the Jupyter kernels that nbval starts inherit them.
"""
import os

os.environ["COURSE_QUICK"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
