"""A learner's install has none of the test extras (Triton, prdc, playwright, nbval, pytest): the library imports and
the lesson that uses Triton runs without them. The suite itself has them installed, so these tests hide them from a
child process with an import blocker on its path (a `sitecustomize` that refuses the names)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("triton", "prdc", "playwright", "nbval", "pytest", "xdist")
NEEDS_AN_EXTRA = {"course_lib.kernels.triton_kernels"}  # Triton's kernels themselves: imported only when it is there


def blocked_env(tmp_path: Path) -> dict:
    """An environment whose Python cannot import the test extras, as on a learner's machine."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        class _NoExtras:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {EXTRAS!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (hidden: a learner's install)", name=name)
                return None
        sys.meta_path.insert(0, _NoExtras())
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["COURSE_QUICK"] = "1"
    env.pop("TRITON_INTERPRET", None)
    return env


def test_the_blocker_hides_the_extras(tmp_path):
    env = blocked_env(tmp_path)
    r = subprocess.run([sys.executable, "-c", "import triton"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "hidden: a learner's install" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import torch, course_lib; print('ok')"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_every_library_module_imports_without_the_extras(tmp_path):
    script = textwrap.dedent(f"""
        import importlib, pkgutil, course_lib
        failed = []
        for m in pkgutil.walk_packages(course_lib.__path__, "course_lib."):
            if m.name in {sorted(NEEDS_AN_EXTRA)!r} or m.name.endswith("__main__"):  # __main__ runs the CLI
                continue
            try:
                importlib.import_module(m.name)
            except Exception as e:
                failed.append(f"{{m.name}}: {{type(e).__name__}}: {{e}}")
        print("\\n".join(failed) or "all imported")
    """)
    r = subprocess.run([sys.executable, "-c", script], env=blocked_env(tmp_path), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "all imported", r.stdout


def test_lesson_5s_student_copy_runs_without_triton(tmp_path):
    """The lesson says its kernel cells are skipped without Triton: every cell must run, and say so."""
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "student" / "05_fast_diffusion.ipynb", as_version=4)
    env = blocked_env(tmp_path)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    saved = dict(os.environ)
    try:  # the kernel inherits this process's environment
        os.environ.clear()
        os.environ.update(env)
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert all(o.output_type != "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Triton: not installed" in outputs
    assert "def lincomb_kernel(" in outputs  # the kernel can be read without Triton
    assert json.dumps(nb)  # the executed notebook is intact
