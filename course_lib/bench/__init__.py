"""The benchmarks behind `python -m course_lib bench ...`: samplers (lesson 3), compare (lesson 4), kernels (lesson 5),
guidance (lesson 6). Each prints a table and, with --json, writes flat records; the shipped ones are in data/."""
from __future__ import annotations


def refuse_to_overwrite(json_path, force: bool) -> None:
    """Every benchmark's --json, checked before the run: an existing file is replaced only with --force, and a folder
    or an unwritable place is refused."""
    if json_path is not None:
        from ..outputs import Plan

        Plan(force=force).output(json_path, "benchmark records (--json)")


def report(records: list[dict], table: str, verdict: dict, json_path=None) -> list[dict]:
    """What a training benchmark ends with: print its table and verdict (floats to 3 places); with json_path write the
    records atomically."""
    from ..checkpoints import write_json_atomic

    print(table)
    print("verdict:", {k: round(v, 3) if isinstance(v, float) else v for k, v in verdict.items()})
    if json_path:
        write_json_atomic(records, json_path)
        print(f"wrote {json_path}")
    return records


def __getattr__(name: str):
    """Earlier releases had the sampler benchmark here (`from course_lib import bench; bench.targets(...)`,
    `from course_lib.bench import Judge`): its names still resolve, to course_lib.bench.samplers."""
    import importlib
    import types

    samplers = importlib.import_module(".samplers", __name__)
    # modules that samplers imports (torch, math, ...) are not its names: torch.compile's cache, walking
    # attributes, asked for course_lib.bench.torch and got a warning
    value = getattr(samplers, name, types)  # `types` stands for "absent": a module, refused below
    if name.startswith("__") or isinstance(value, types.ModuleType):
        raise AttributeError(f"module 'course_lib.bench' has no attribute {name!r}")
    from .._moved import moved_warning

    moved_warning(f"course_lib.bench.{name}", f"course_lib.bench.samplers.{name}")
    return value
