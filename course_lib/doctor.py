"""`doctor`: what is installed, which device, whether widgets and Triton work, and whether quick mode is on."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys

from packaging.version import Version

from . import runtime


def _requirements(extra: str | None = None) -> dict[str, str]:
    """{distribution: version specifier} as course_lib declares them (pyproject.toml), without an extra or for one."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        declared = md.requires("course_lib") or []
    except md.PackageNotFoundError:  # running from a source tree that was never installed
        declared = []
    out = {}
    for spec in declared:
        try:
            req = Requirement(spec)
        except InvalidRequirement:
            continue
        marker = str(req.marker or "")
        if (f'extra == "{extra}"' in marker) if extra else "extra ==" not in marker:
            out[req.name] = str(req.specifier)
    return out


# every dependency pyproject.toml declares, with its range (bare names where course_lib's metadata is missing)
REQUIRED = _requirements() or dict.fromkeys(["torch", "numpy", "matplotlib", "ipywidgets", "jupyterlab", "ipykernel",
                                             "ipython", "scikit-learn", "tqdm", "nbformat", "packaging", "scipy",
                                             "POT", "pillow", "diffusers", "transformers", "peft", "torchmetrics"], "")
OPTIONAL = {n: v for n, v in (_requirements("test") or dict.fromkeys(
    ["pytest", "nbval", "nbclient", "prdc", "triton", "playwright"], "")).items() if n not in REQUIRED}


def requirement_status(dist: str, specifier: str) -> tuple[bool, str]:
    """Whether `dist` is installed in the range `specifier`, and the line to print."""
    from packaging.specifiers import SpecifierSet

    v = _version(dist)
    if v is None:
        return False, "MISSING"
    if specifier and not SpecifierSet(specifier).contains(Version(v), prereleases=True):
        return False, f"{v} (outside the required {specifier})"
    return True, v

def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None

def widgets_status() -> tuple[bool, str]:
    """Whether ipywidgets is importable and in the supported range (>=7.6, <9)."""
    v = _version("ipywidgets")
    if v is None:
        return False, "ipywidgets is not installed: sliders will not show (pip install 'ipywidgets>=7.6,<9')"
    if not Version("7.6") <= Version(v) < Version("9"):
        return False, f"ipywidgets {v} is outside the supported range >=7.6,<9"
    try:
        import ipywidgets

        ipywidgets.IntSlider(value=1, min=0, max=2)
    except Exception as e:
        return False, f"ipywidgets {v} failed to build a slider: {e}"
    return True, f"ipywidgets {v}"

def triton_status() -> tuple[bool, str]:
    """Whether Triton imports, and whether it can run here (a CUDA GPU) or only in its CPU interpreter."""
    if _version("triton") is None:
        return False, "not installed (only lesson 5 needs it: pip install triton)"
    if os.environ.get("COURSE_GRADING"):  # inside the grader's sandbox, which starts no processes
        return False, "installed, not checked while grading"
    code = "import triton, triton.language"  # a subprocess: a broken Triton must not break the doctor
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:  # e.g. inside the grader, where starting processes is refused
        return False, f"installed, not checked here ({type(e).__name__}: {e})"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        return False, f"installed but fails to import: {last}"
    import torch

    where = "on the GPU" if torch.cuda.is_available() else "in the CPU interpreter (TRITON_INTERPRET=1)"
    return True, f"triton {_version('triton')}, kernels run {where}"

def report() -> tuple[bool, list[str]]:
    """The doctor's findings as (course can run, lines to print)."""
    lines, ok, info = [], True, None
    lines.append(f"Python       {platform.python_version()} on {platform.system()} {platform.machine()}")
    for dist, spec in REQUIRED.items():
        good, text = requirement_status(dist, spec)
        ok &= good
        lines.append(f"{dist:<13}{text}{'' if good else ' (required)'}")
    for dist, spec in OPTIONAL.items():
        good, text = requirement_status(dist, spec)
        lines.append(f"{dist:<13}{text if _version(dist) else 'not installed'}"
                     + ("" if good or not _version(dist) else " (tests only)"))
    try:
        import torch

        info = runtime.device_info()
        x = torch.randn(64, 64, device=info.device)
        float((x @ x).sum())  # the device really computes
        lines.append(f"Device       {info}")
    except Exception as e:
        ok = False
        lines.append(f"Device       FAILED: {type(e).__name__}: {e}")
    for label, (good, text) in (("Widgets", widgets_status()), ("Triton", triton_status())):
        lines.append(f"{label:<13}{'ok' if good else 'no'}: {text}")
    try:
        lines.append(f"Threads      {runtime.configure_threads()}")
    except ValueError as e:
        ok = False
        lines.append(f"Threads      FAILED: {e}")
    try:
        dtype = runtime.autocast_dtype(info.device if info is not None else "cpu")
        lines.append("Precision    " + (f"training under {str(dtype).replace('torch.', '')} autocast "
                                        f"({runtime.PRECISION_ENV}=fp32 keeps fp32)" if dtype else "training in fp32"))
    except ValueError as e:
        ok = False
        lines.append(f"Precision    FAILED: {e}")
    try:
        lines.append(f"Mode         {runtime.describe_mode().splitlines()[0]}")
    except ValueError as e:
        ok = False
        lines.append(f"Mode         FAILED: {e}")
    lines.append(f"Colab        {'yes' if runtime.in_colab() else 'no'}")
    lines.append("Verdict      " + ("the course can run here." if ok else "something required is missing (see above)."))
    return ok, lines

def main() -> int:
    ok, lines = report()
    print("\n".join(lines))
    return 0 if ok else 1
