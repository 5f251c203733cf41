"""Does bf16 autocast train as well as fp32 on a CPU? The digits and ring8 presets trained both ways from the same
seed, steps and data (same initial weights, same batches, same timesteps and noise), then sampled from the same noise
and scored (`python -m course_lib bench bf16`). The Trainer's CPU default (`runtime.autocast_dtype`) follows it."""
from __future__ import annotations

import statistics
import time

import torch

SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
DATASETS = ("digits", "ring8")
QUICK_STEPS = {"digits": 30, "ring8": 150}
# the metric a verdict reads per dataset, and whether lower is better
METRIC = {"digits": ("fd", True), "ring8": ("swd", True)}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def train_one(dataset: str, seed: int, precision: str, quick: bool = False, samples: int = 1000) -> dict:
    """Train the dataset's preset with `seed` in `precision` ('fp32' or 'bf16' autocast), sample it and score it."""
    from ..train import Trainer, preset
    from .compare import generate
    from .samplers import Judge

    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {list(DTYPES)}, got {precision!r}")
    config = preset(dataset, seed=seed, **({"steps": QUICK_STEPS[dataset]} if quick else {}))
    trainer = Trainer(config, "cpu")
    trainer.amp_dtype = DTYPES[precision]  # the comparison sets it either way, whatever the CPU default is
    trainer.train(progress=False)
    x, nfe, seconds = generate(trainer.ema, "diffusion", dataset, samples, seed=1000 + seed, schedule=trainer.schedule)
    tail = trainer.losses[-(len(trainer.losses) // 20 + 1):]  # the last 5% of steps
    scores = Judge(dataset, samples)(x)
    return {"dataset": dataset, "seed": seed, "dtype": precision, "steps": trainer.step,
            "train_seconds": round(trainer.elapsed, 2), "ms_per_step": round(1000 * trainer.elapsed / trainer.step, 2),
            "final_loss": round(sum(tail) / len(tail), 5), "samples": samples, "nfe": nfe,
            "threads": torch.get_num_threads(), **scores}  # scores has its own "precision" (precision/recall)


def time_steps(dataset: str, rounds: int = 5, steps: int | None = None) -> dict:
    """Milliseconds per training step of the dataset's preset in fp32 and in bf16, measured in interleaved rounds on
    two trainers built alike (medians over rounds): the speed-up without the sampling and scoring around it."""
    from ..train import Trainer, preset

    steps = steps or (5 if dataset == "digits" else 30)
    trainers = {}
    for precision, dtype in DTYPES.items():
        trainers[precision] = Trainer(preset(dataset), "cpu")
        trainers[precision].amp_dtype = dtype
        for _ in range(3):  # warm-up
            trainers[precision].train_step()
    times = {p: [] for p in DTYPES}
    for _ in range(rounds):
        for precision, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            times[precision].append(1000 * (time.perf_counter() - start) / steps)
    ms = {p: statistics.median(v) for p, v in times.items()}
    return {"dataset": dataset, "fp32_ms": round(ms["fp32"], 2), "bf16_ms": round(ms["bf16"], 2),
            "speedup": round(ms["fp32"] / ms["bf16"], 2), "rounds": rounds, "threads": torch.get_num_threads()}


def run(datasets=DATASETS, seeds=SEEDS, quick: bool = False, samples: int = 1000, progress=None) -> list[dict]:
    """Per dataset and seed, fp32 then bf16 (interleaved, so both see the same machine load)."""
    progress = progress or (lambda line: print(line, flush=True))
    records = []
    for dataset in datasets:
        for seed in seeds:
            for precision in DTYPES:
                rec = train_one(dataset, seed, precision, quick, samples)
                records.append(rec)
                metric = METRIC[dataset][0]
                progress(f"{dataset:<6} seed {seed} {precision}: {metric} {rec[metric]:.4f}, final loss "
                         f"{rec['final_loss']:.4f}, {rec['ms_per_step']:.1f} ms/step ({rec['train_seconds']:.0f} s)")
    return records


def verdict(records: list[dict], dataset: str) -> dict:
    """bf16 passes on `dataset` when its mean score over seeds is no worse than fp32's worst seed (within fp32's seed
    spread, or better); also the paired per-seed differences. (Speed: time_steps, measured apart from the runs.)"""
    metric, lower = METRIC[dataset]
    by = {p: {r["seed"]: r for r in records if r["dataset"] == dataset and r["dtype"] == p} for p in DTYPES}
    seeds = sorted(set(by["fp32"]) & set(by["bf16"]))
    if not seeds:
        raise ValueError(f"no seed of {dataset!r} was trained in both precisions")
    fp32 = [by["fp32"][s][metric] for s in seeds]
    bf16 = [by["bf16"][s][metric] for s in seeds]
    worst = max(fp32) if lower else min(fp32)
    mean_bf16 = statistics.fmean(bf16)
    ok = mean_bf16 <= worst if lower else mean_bf16 >= worst
    return {"dataset": dataset, "metric": metric, "seeds": seeds, "fp32": fp32, "bf16": bf16,
            "fp32_mean": round(statistics.fmean(fp32), 4), "fp32_range": [min(fp32), max(fp32)],
            "bf16_mean": round(mean_bf16, 4), "paired_differences": [round(b - f, 4) for f, b in zip(fp32, bf16)],
            "bf16_ok": ok}


def describe(v: dict) -> str:
    """One sentence per dataset: both means, fp32's spread, the paired differences and the verdict."""
    return (f"{v['dataset']}: {v['metric']} bf16 {v['bf16_mean']:.4g} (mean of {len(v['seeds'])} seeds) vs fp32 "
            f"{v['fp32_mean']:.4g} (seeds {v['fp32_range'][0]:.4g} to {v['fp32_range'][1]:.4g}); bf16 - fp32 per seed "
            f"{', '.join(f'{d:+.3g}' for d in v['paired_differences'])}: "
            + ("within fp32's seed spread" if v["bf16_ok"] else "worse than every fp32 seed, keep fp32"))


def main_bf16(quick: bool, json_path, samples, force: bool) -> int:
    from ..checkpoints import write_json_atomic
    from ..runtime import cpu_has_bf16
    from . import refuse_to_overwrite

    refuse_to_overwrite(json_path, force)
    start = time.perf_counter()
    records = run(seeds=QUICK_SEEDS if quick else SEEDS, quick=quick, samples=samples or (200 if quick else 1000))
    verdicts = [verdict(records, d) for d in DATASETS]
    timings = [time_steps(d, rounds=2 if quick else 5) for d in DATASETS]
    print()
    for v in verdicts:
        print(describe(v))
    for t in timings:
        print(f"{t['dataset']}: one training step {t['fp32_ms']:.1f} ms in fp32, {t['bf16_ms']:.1f} ms in bf16 "
              f"({t['speedup']:.2f}x; medians of {t['rounds']} interleaved rounds, {t['threads']} threads)")
    print(f"({time.perf_counter() - start:.0f} s; this CPU "
          f"{'has' if cpu_has_bf16() else 'lacks'} native bf16 arithmetic (AVX512-BF16 or AMX))")
    if json_path:
        write_json_atomic({"records": records, "verdicts": verdicts, "step_times": timings, "native_bf16": cpu_has_bf16(),
                           "command": "python -m course_lib bench bf16" + (" --quick" if quick else "")}, json_path,
                          replace=force)
        print(f"Wrote {json_path}")
    return 0

