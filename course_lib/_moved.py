"""Old module names (before the package layout of 2026-12) kept importable, so that a learner's saved copy of an
earlier release, and a submission made from one, still run: `import course_lib.models` gives course_lib.nets, with a
one-line FutureWarning that says where it lives now."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {"course_lib.models": "course_lib.nets", "course_lib.compare": "course_lib.bench.compare",
         "course_lib.bench_kernels": "course_lib.bench.kernels", "course_lib.graphs": "course_lib.kernels.graphs",
         "course_lib.profiling": "course_lib.kernels.profiling",
         "course_lib.triton_kernels": "course_lib.kernels.triton_kernels", "course_lib.release": "course_lib.grading.release"}


def moved_warning(old: str, new: str) -> None:
    warnings.warn(f"{old} is now {new}: this still works, and the current lessons use the new name", FutureWarning,
                  stacklevel=3)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and loads it as the module that replaced it (the very same module object)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        moved_warning(spec.name, MOVED[spec.name])
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())  # last: only names no other finder knows
