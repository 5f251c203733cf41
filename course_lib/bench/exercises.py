"""Calibration of the exercises graded on a training run (`python -m course_lib bench exercises`): the reference and
honest variants in other styles on many fresh tasks (they must pass every one), each known mistake and shortcut (they
must fail, with their own hint), and the seconds one check takes on one CPU thread. What the judge measured on each
task (the exercises' `*_measure` functions) is recorded beside the verdict, so the thresholds can be read
against the distributions."""
from __future__ import annotations

import statistics
import time

import torch

from .honest_styles import HONEST  # honest solutions in other styles

TASKS = {"reference": 20, "honest": 10, "mistake": 5, "shortcut": 3}
QUICK_TASKS = {"reference": 2, "honest": 1, "mistake": 1, "shortcut": 1}
MORE_TASKS = {"repaint": 2, "consistency_sample": 5, "ddim_invert": 5}  # checks that take about a second: this many times the tasks
CAPSTONE_TASKS = {"reference": 20, "honest": 5, "mistake": 3, "shortcut": 2}  # a check is about a minute


def solutions(name: str) -> list[tuple[str, str, object, str | None]]:
    """(kind, label, function, the hint fragment a failure must show) for one exercise, in a fixed order."""
    from ..exercises import EXERCISES

    ex = EXERCISES[name]
    out = [("reference", "reference", ex.reference, None)]
    out += [("honest", label, fn, None) for label, fn in HONEST.get(name, {}).items()]
    out += [("mistake", f"hint '{hint}'", fn, hint) for fn, hint in ex.mistakes]
    out += [("shortcut", fn.__name__.strip("_"), fn, fragment) for fn, fragment in ex.shortcuts]
    return out


def _one(job: tuple) -> dict:
    """One check of one solution (its position in `solutions`) on one task, in a worker with one CPU thread."""
    from ..exercises import EXERCISES, judge_task, run_task
    from ..exercises.capstone import capstone_measure
    from ..exercises.lesson6 import repaint_measure
    from ..exercises.lesson10 import masked_measure
    from ..exercises.lesson11 import edm_measure
    from ..exercises.lesson12 import consistency_measure
    from ..exercises.lesson13_inversion import inversion_measure
    from ..exercises.on_images import ae_measure, contrastive_measure
    from ..exercises.on_training import cond_measure, flow_measure

    name, position, seed = job
    torch.set_num_threads(1)
    kind, label, fn, fragment = solutions(name)[position]
    ex = EXERCISES[name]
    start = time.perf_counter()
    task = ex.task(torch.Generator().manual_seed(seed))
    outputs = run_task(fn, task)
    verdict = judge_task(ex, task, outputs)
    seconds = time.perf_counter() - start
    measures = {"cond_train_step": cond_measure, "flow_step": flow_measure, "masked_step": masked_measure,
                "repaint": repaint_measure, "text_to_shapes": capstone_measure, "ae_step": ae_measure, "contrastive_loss": contrastive_measure,
                "edm_step": edm_measure, "consistency_sample": consistency_measure, "ddim_invert": inversion_measure}
    _, measured = measures[name](task, outputs) if name in measures else (None, {})
    text = "" if verdict is None else f"{verdict.message} {verdict.hint}"
    return {"exercise": name, "kind": kind, "solution": label, "seed": seed, "passed": verdict is None,
            "hint_shown": None if fragment is None else fragment in text, "seconds": round(seconds, 2),
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in measured.items() if k != "known_kept"}}


NAMES = ("repaint", "cond_train_step", "ae_step", "contrastive_loss", "flow_step", "masked_step", "edm_step",
         "consistency_sample", "ddim_invert")


def run(names=NAMES, tasks=None, jobs: int = 2, progress=None) -> list[dict]:
    """Every solution of every named exercise on its number of fresh tasks (task seeds 0, 1, ...)."""
    import multiprocessing

    tasks = tasks or TASKS
    progress = progress or (lambda line: print(line, flush=True))
    work = [(name, position, seed) for name in names for position, (kind, *_) in enumerate(solutions(name))
            for seed in range(tasks[kind] * MORE_TASKS.get(name, 1))]
    records = []
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        for rec in pool.imap(_one, work):
            records.append(rec)
            shown = "" if rec["hint_shown"] is None else ", its hint shown" if rec["hint_shown"] else ", ANOTHER HINT"
            progress(f"{rec['exercise']:<12} {rec['solution']:<34} seed {rec['seed']:>2}: "
                     f"{'passed' if rec['passed'] else 'failed'}{shown} ({rec['seconds']:.1f} s)")
    return records


def summarize(records: list[dict]) -> list[str]:
    """One line per (exercise, solution): passes of tasks, hints shown, seconds, and the judge's measures' ranges."""
    lines = []
    keys = list(dict.fromkeys((r["exercise"], r["kind"], r["solution"]) for r in records))
    for name, kind, label in keys:
        mine = [r for r in records if (r["exercise"], r["kind"], r["solution"]) == (name, kind, label)]
        numeric = [k for k, v in mine[0].items() if isinstance(v, float) and k not in ("seconds",)]
        ranges = ", ".join(f"{k} {min(r[k] for r in mine if k in r):.3g} to {max(r[k] for r in mine if k in r):.3g}"
                           for k in numeric if all(k in r for r in mine))
        hints = "" if mine[0]["hint_shown"] is None else f", its own hint {sum(bool(r['hint_shown']) for r in mine)}/{len(mine)}"
        lines.append(f"{name} {kind} {label}: passed {sum(r['passed'] for r in mine)}/{len(mine)}{hints}; "
                     f"{statistics.median(r['seconds'] for r in mine):.1f} s per check (median, one thread)"
                     + (f"; {ranges}" if ranges else ""))
    return lines


def main_exercises(quick: bool, json_path, force: bool, jobs: int, only=None, capstone: bool = False) -> int:
    """`bench exercises` (the exercises graded on training runs and loops) or, with capstone, `bench capstone`."""
    from ..checkpoints import write_json_atomic
    from . import refuse_to_overwrite

    refuse_to_overwrite(json_path, force)
    start = time.perf_counter()
    unknown = sorted(set(only or ()) - set(NAMES))
    if unknown:
        raise ValueError(f"--only takes exercises of {', '.join(NAMES)}; got {', '.join(unknown)}")
    names = ("text_to_shapes",) if capstone else tuple(only or NAMES)
    tasks = QUICK_TASKS if quick else CAPSTONE_TASKS if capstone else TASKS
    records = run(names=names, tasks=tasks, jobs=jobs)
    print()
    print("\n".join(summarize(records)))
    print(f"({time.perf_counter() - start:.0f} s with {jobs} process(es) of one thread)")
    if json_path:
        command = (f"python -m course_lib bench {'capstone' if capstone else 'exercises'}" + (" --quick" if quick else "")
                   + (f" --only {' '.join(only)}" if only else ""))
        from pathlib import Path

        if only and Path(json_path).exists():  # --only into an existing file: the other exercises' records are kept
            from ..checkpoints import read_json

            old = read_json(json_path)
            records = [r for r in old["records"] if r["exercise"] not in names] + records
            command = f"{old['command']} && {command}"
        write_json_atomic({"records": records, "summary": summarize(records), "command": command},
                          json_path, replace=force)
        print(f"Wrote {json_path}")
    return 0
