"""course_lib: the tested library behind the hands-on diffusion course. One module per idea the lessons teach."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["check", "progress", "budget", "get_device", "is_quick", "seed_everything"]

# The shipped checkpoints in data/, by name (here, not in checkpoints.py, so the command line can list them
# without importing torch: `python -m course_lib --help` answers at once).
SHIPPED_MODELS = ("ring8", "ring8_cond", "grid25", "digits", "digits_cond", "digits_classifier",
                  "digits_noisy_classifier", "shapes_classifier", "shapes_ae", "shapes_clip", "shapes_ldm",
                  "shapes_pixel", "shapes_dit", "shapes_dit_long", "ring8_flow", "grid25_flow", "ring8_reflow",
                  "ring8_distilled", "digits_flow", "captions_mdlm", "captions_ar", "digits_edm",
                  "digits_cd", "digits_ct", "digits_pd", "digits_add", "shapes_lcm", "shapes_star_judge",
                  "reaching_diffusion")
# lesson 13's adapters of shapes_ldm: each a folder data/NAME in its ecosystem's format (course_lib.adapters)
SHIPPED_ADAPTERS = ("shapes_star_lora", "shapes_star_ti", "shapes_layout_controlnet")


from . import _moved  # noqa: E402

_moved.install()  # the module names of earlier releases (course_lib.models, ...) still import


def __getattr__(name: str):
    """budget, get_device, is_quick and seed_everything come from course_lib.runtime, imported on first use."""
    if name in ("budget", "get_device", "is_quick", "seed_everything"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'course_lib' has no attribute {name!r}")


def check(name: str, fn):
    """Check your function for exercise `name`: prints passed / failed with a hint / not attempted; returns a verdict
    that is true when it passed (and shows nothing more in a notebook)."""
    from .exercises import check as _check  # imported on first use: the grader's sandbox never loads the answers

    return _check(name, fn)


def progress(lesson: int | str | None = None):
    """Print one lesson's exercises (default: the lesson of your latest check; "all": one line per lesson) with status
    and points as checked in this kernel; return (points, total)."""
    from .exercises import progress as _progress

    return _progress(lesson)
