"""The benchmarks behind `python -m course_lib bench ...`: samplers (lesson 3), compare (lesson 4), kernels (lesson 5),
guidance (lesson 6). Each prints a table and, with --json, writes flat records; the shipped ones are in data/. Here:
what the training benchmarks share (the --json check, the report, the teacher-call counter, the means over seeds)."""
from __future__ import annotations

import statistics
from pathlib import Path

SAVE_EVERY = 100  # training steps between a benchmark run's checkpoints (with --json: in JSON_PATH.runs/)


class ImageCounter:
    """Counts the images a network is called on (a forward hook): the teacher evaluations training spends."""

    def __init__(self, net):
        self.n = 0
        net.register_forward_hook(lambda module, args, out: setattr(self, "n", self.n + args[0].shape[0]))


def seed_rows(records: list[dict], metrics, shared=()) -> list[dict]:
    """One row per model (in order of appearance) and budget (`nfe_K`): each metric's mean over the seeds and its
    spread (`<metric>_std`, 0 for one seed); the `shared` keys of a budget; the counted training costs (teacher
    evaluations, steps: the same on every seed) as they are; and `train_minutes` of the lowest seed's run only
    (`minutes_seed`): minutes depend on the machine, and the seeds of a benchmark may run on machines of different
    speed, so a mean over them would compare nothing."""
    out = []
    for name in dict.fromkeys(r["name"] for r in records):
        group = [r for r in records if r["name"] == name]
        for key in sorted((k for k in group[0] if k.startswith("nfe_")), key=lambda k: int(k[4:])):
            row = {"name": name, "nfe": int(key[4:]), "seeds": len(group), **{k: group[0][key][k] for k in shared}}
            for m in metrics:
                vals = [r[key][m] for r in group]
                row[m], row[m + "_std"] = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
            for k in ("teacher_evaluations", "steps"):
                if k in group[0]:
                    row[k] = statistics.mean(r[k] for r in group)
            first = min(group, key=lambda r: r["seed"])
            if "train_minutes" in first:
                row["train_minutes"], row["minutes_seed"] = first["train_minutes"], first["seed"]
            out.append(row)
    return out


def minutes_note(rows: list[dict]) -> str:
    """The cost columns' footnote: whose minutes the table shows (seed_rows keeps the lowest seed's)."""
    seeds = sorted({r["minutes_seed"] for r in rows if "minutes_seed" in r})
    return (f"train min: the training run of seed {', '.join(map(str, seeds))} on one CPU thread (minutes depend on the "
            "machine; teacher evals are counted, the same on every seed)") if seeds else ""


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


def run_tasks(tasks: list[dict], run_one, key, jobs: int = 1, done=(), on_record=None, desc: str = "bench",
              progress: bool = True) -> list[dict]:
    """Run run_one(**task) for every task whose key(task) is not among the records `done` (key(record) names the same
    run), in `jobs` processes of one CPU thread each; on_record(records) after each finished run (a partial file).
    Returns the records in the tasks' order."""
    import torch

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    records = list(done)
    finished = {key(r) for r in records}
    todo = [t for t in tasks if key(t) not in finished]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=desc, unit="run")

    def add(rec):
        records.append(rec)
        if on_record is not None:
            on_record(records)
        if bar is not None:
            bar.update()

    if jobs == 1:
        for task in todo:
            add(run_one(**task))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                    initargs=(1,)) as pool:
            for f in cf.as_completed([pool.submit(run_one, **task) for task in todo]):
                add(f.result())
    if bar is not None:
        bar.close()
    rank = {key(t): i for i, t in enumerate(tasks)}
    return sorted(records, key=lambda r: rank.get(key(r), len(rank)))


def resumable(json_path, force: bool, resume: bool):
    """(the records already measured, on_record) for a benchmark that saves each finished run to JSON_PATH.partial:
    --resume continues from that file; without it an unfinished run there is refused unless --force."""
    from pathlib import Path

    from ..checkpoints import read_json, write_json_atomic

    refuse_to_overwrite(json_path, force)
    if resume and json_path is None:
        raise ValueError("--resume continues a run saved with --json FILE; pass the same --json")
    if json_path is None:
        return [], None
    partial = Path(f"{json_path}.partial")
    done = []
    if resume and partial.exists():
        done = read_json(partial)
        print(f"Resuming from {partial}: {len(done)} runs already measured")
    elif partial.exists() and not force:
        raise ValueError(f"{partial} holds an unfinished run: pass --resume to continue it, or --force to start again")
    return done, lambda recs: write_json_atomic(recs, partial)


def runs_folder(json_path, resume: bool):
    """JSON_PATH.runs, where a benchmark's training runs save their state as they train (None without --json); a run
    that starts afresh (no --resume) clears the states a stopped run left there."""
    if json_path is None:
        return None
    import shutil

    folder = Path(f"{json_path}.runs")
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
    return folder


def run_checkpoint(runs_dir, task: dict):
    """Where a benchmark run's training state is saved as it trains (None without a runs folder): one file per run."""
    if runs_dir is None:
        return None
    return str(Path(runs_dir) / f"{task['kind']}_{task.get('name', 'run')}_seed{task['seed']}.pt")


def start_or_resume(config, path):
    """(trainer, extra): a fresh Trainer for `config`, or one continued exactly from the run checkpoint at `path`
    (written by save_run) with what save_run stored beside its state; a checkpoint of another configuration is
    refused, since continuing it would measure a run nobody asked for."""
    from ..checkpoints import load_checkpoint
    from ..train import Trainer

    trainer = Trainer(config)
    if path is None or not Path(path).exists():
        return trainer, {}
    state = load_checkpoint(path)
    if state.get("kind") != "train_state" or state["config"] != config.to_dict():
        raise ValueError(f"{path} holds a training run of another configuration; delete it to start this run afresh")
    trainer.load_state_dict(state)
    return trainer, state.get("bench", {})


def save_run(trainer, path, **extra) -> None:
    """Save a benchmark run's full training state (and `extra`: counted teacher evaluations, models kept) to `path`
    atomically, so that a stopped benchmark continues the run where it stopped rather than from step 0."""
    if path is not None:
        from ..checkpoints import save_atomic

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_atomic({**trainer.state_dict(), "bench": extra}, path)


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
