"""The benchmarks behind `python -m course_lib bench ...`: samplers (lesson 3), compare (lesson 4), kernels (lesson 5),
guidance (lesson 6). Each prints a table and, with --json, writes flat records; the shipped ones are in data/. Here:
what the training benchmarks share (the --json check, the report, the teacher-call counter, the means over seeds)."""
from __future__ import annotations

import statistics


class ImageCounter:
    """Counts the images a network is called on (a forward hook): the teacher evaluations training spends."""

    def __init__(self, net):
        self.n = 0
        net.register_forward_hook(lambda module, args, out: setattr(self, "n", self.n + args[0].shape[0]))


def seed_rows(records: list[dict], metrics, shared=()) -> list[dict]:
    """One row per model (in order of appearance) and budget (`nfe_K`): each metric's mean over the seeds and its
    spread (`<metric>_std`, 0 for one seed); the `shared` keys of a budget and the training costs as they are."""
    out = []
    for name in dict.fromkeys(r["name"] for r in records):
        group = [r for r in records if r["name"] == name]
        for key in sorted((k for k in group[0] if k.startswith("nfe_")), key=lambda k: int(k[4:])):
            row = {"name": name, "nfe": int(key[4:]), "seeds": len(group), **{k: group[0][key][k] for k in shared}}
            for m in metrics:
                vals = [r[key][m] for r in group]
                row[m], row[m + "_std"] = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
            for k in ("teacher_evaluations", "train_minutes", "steps"):
                if k in group[0]:
                    row[k] = statistics.mean(r[k] for r in group)
            out.append(row)
    return out


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
