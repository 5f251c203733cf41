"""Lesson 4's benchmark: diffusion vs GAN vs VAE on the same data, the same budget, several seeds.

`python -m course_lib bench compare [--quick] [--json PATH]` trains every family on every dataset for each seed
with the same number of optimizer steps and batch size (a GAN step is one discriminator and one generator update),
then measures sample quality, sampling cost, likelihood where it is defined, and sharpness. One flat record per
(dataset, family, seed).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from . import refuse_to_overwrite

COMPARE_DATASETS = ("ring8", "grid25", "digits")
FAMILY_NAMES = ("diffusion", "gan", "vae")
# The budget is the same for every family on a dataset. Measured on 2 CPU cores, seconds per run for diffusion / GAN /
# VAE: 2D about 33 / 97 / 40, digits 110 / 131 / 43; the full run (3 seeds) took 2,110 s.
BUDGET = {"ring8": dict(steps=4000, batch_size=512), "grid25": dict(steps=4000, batch_size=512),
          "digits": dict(steps=2000, batch_size=128)}
QUICK_BUDGET = {"ring8": dict(steps=150, batch_size=256), "grid25": dict(steps=150, batch_size=256),
                "digits": dict(steps=30, batch_size=64)}
SEEDS, QUICK_SEEDS = (0, 1, 2), (0, 1)
EXPORT_COMMAND = "python -m course_lib bench compare --json data/bench_compare.json --export data/compare --force"
DIFFUSION_SAMPLER, DIFFUSION_NFE = "dpmpp_2m", 20  # lesson 3's best few-step sampler (Karras spacing)
# The freshly trained comparison models have no tuned card, so they sample with one fixed Karras range per dataset,
# chosen by a sigma_max sweep at 10 NFE on the shipped checkpoints before the comparison ran, the same for every seed.
DIFFUSION_KARRAS_RANGE = {"ring8": (0.04, 2.0), "grid25": (0.04, 2.0), "digits": (0.1, 80.0)}
RECORD_KEYS = ("dataset", "family", "seed", "steps", "batch_size", "parameters", "train_seconds", "sampler", "nfe",
               "ms_per_sample", "samples", "hq_fraction", "modes_covered", "swd", "fd", "precision", "recall",
               "class_coverage", "nll", "nll_unit", "hf_energy", "final_loss", "loss_curve", "g_loss_curve")


def compare_config(dataset: str, family: str, seed: int, quick: bool = False):
    """The TrainConfig of one benchmark run: the family's preset for `dataset` with the shared budget and `seed`."""
    from ..train import COMPARE_UNET, preset

    if dataset not in COMPARE_DATASETS or family not in FAMILY_NAMES:
        raise ValueError(f"dataset must be one of {COMPARE_DATASETS} and family one of {FAMILY_NAMES}, "
                         f"got {dataset!r} and {family!r}")
    overrides = dict((QUICK_BUDGET if quick else BUDGET)[dataset], seed=seed)
    if family == "diffusion" and dataset == "digits":
        overrides["model"] = COMPARE_UNET  # 177k parameters, like the GAN's generator and the VAE
    return preset(dataset if family == "diffusion" else f"{dataset}_{family}", **overrides)


@torch.no_grad()
def generate(model, family: str, dataset: str, n: int, seed: int = 1, schedule=None) -> tuple[torch.Tensor, int, float]:
    """n samples from a trained model: (samples on the CPU, network evaluations per sample, seconds in all)."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    start = time.perf_counter()
    if family == "diffusion":
        from ..samplers import karras_sigmas, sample

        device = next(model.parameters()).device
        shape = (n, 1, 8, 8) if dataset == "digits" else (n, 2)
        sigmas = karras_sigmas(DIFFUSION_NFE, *DIFFUSION_KARRAS_RANGE[dataset])
        res = sample(model, torch.randn(shape, generator=g).to(device), schedule, DIFFUSION_SAMPLER, sigmas=sigmas,
                     clip=1.0 if dataset == "digits" else None, generator=g)
        x, nfe = res.x, res.nfe
    elif family in ("gan", "vae"):
        x, nfe = model.sample(n, g), 1
    else:
        raise ValueError(f"family must be one of {FAMILY_NAMES}, got {family!r}")
    if dataset == "digits":
        x = x.clamp(-1, 1)
    x = x.float().cpu()
    return x, nfe, time.perf_counter() - start


@torch.no_grad()
def held_out_nll(model, family: str, dataset: str, schedule=None, n: int = 2000, n_t: int | None = None,
                 seed: int = 7) -> tuple[float | None, str]:
    """A bound on the negative log-likelihood of held-out data, in the same units for every family.

    Digits: bits per dimension of the 297 test images (17 grey levels, discretized decoders). 2D: nats per point
    on n fresh points. Diffusion: the variational bound (Ho et al. 2020, eq. 5, beta-tilde variances) of the reverse
    model the samplers run: on digits its x0 estimate is clipped to the data range [-1, 1] (lesson 4 shows the
    unclipped bound is dominated by the last, near-zero-SNR steps). VAE: the negative ELBO (beta = 1, 16 draws of
    z). A GAN defines no likelihood: None. n_t: the diffusion bound's sum over timesteps is exact for None, else
    estimated without bias from n_t random timesteps per sample.
    """
    from ..data import DIGITS_LEVELS, digits_split
    from ..losses import variational_bound
    from ..train import DataSource
    from ..vae import elbo

    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    if dataset == "digits":
        x, levels, unit = digits_split("test")[0].to(device), DIGITS_LEVELS, "bits/dim"
    else:
        x, levels, unit = DataSource(dataset).sample(n, g)[0].to(device), None, "nats/point"
    if family == "gan":
        return None, unit
    if family == "diffusion":
        nats = variational_bound(model, x, schedule, variance="posterior", levels=levels, n_t=n_t, generator=g,
                                 clip=1.0 if dataset == "digits" else None)["total"]
    else:
        nats = -elbo(model, x, levels=levels, n_z=16, generator=g)["elbo"]
    value = nats.mean().item()
    return value / (x[0].numel() * math.log(2)) if levels else value, unit


def default_samples(dataset: str, quick: bool) -> int:
    """Samples scored per run: 5,000 points or 1,000 digits (quick: 1,000 / 200)."""
    return (200 if quick else 1000) if dataset == "digits" else (1000 if quick else 5000)


def curve(values, points: int = 100) -> list[float]:
    """A loss history shrunk to `points` chunk means (for plotting the runs of the benchmark)."""
    values = torch.as_tensor(list(values), dtype=torch.float64)
    if len(values) == 0:
        return []
    chunks = torch.tensor_split(values, min(points, len(values)))
    return [round(c.mean().item(), 5) for c in chunks]


def run_one(dataset: str, family: str, seed: int, quick: bool = False, judge=None, samples: int | None = None,
            device=None, progress: bool = False, export_to: Path | None = None) -> dict:
    """Train one (dataset, family, seed) with the shared budget, then measure it; returns its flat record."""
    from .. import metrics
    from ..train import Trainer
    from .samplers import Judge

    n = samples or default_samples(dataset, quick)
    judge = judge or Judge(dataset, n)
    trainer = Trainer(compare_config(dataset, family, seed, quick), device)
    trainer.train(progress=progress)
    model, schedule = trainer.ema, trainer.schedule
    x, nfe, seconds = generate(model, family, dataset, n, seed=1000 + seed, schedule=schedule)
    scores = judge(x)
    if dataset != "digits":
        scores.update({k: round(v, 4) for k, v in metrics.precision_recall(judge.ref, x).items()})
    if quick:
        nll, unit = held_out_nll(model, family, dataset, schedule, n=500, n_t=10)
    else:
        nll, unit = held_out_nll(model, family, dataset, schedule, n=2000, n_t=100)
    tail = trainer.losses[-(len(trainer.losses) // 20 + 1):]  # the last 5% of steps
    record = {"dataset": dataset, "family": family, "seed": seed, "steps": trainer.step,
              "batch_size": trainer.config.batch_size, "parameters": sum(p.numel() for p in model.parameters()),
              "train_seconds": round(trainer.elapsed, 3),
              "sampler": f"{DIFFUSION_SAMPLER}, karras, {nfe} NFE" if family == "diffusion"
              else ("generator" if family == "gan" else "decoder mean"),
              "nfe": nfe, "ms_per_sample": round(1000 * seconds / n, 4), "samples": n,
              "nll": None if nll is None else round(nll, 4), "nll_unit": unit,
              "hf_energy": round(metrics.high_frequency_energy(x), 4) if dataset == "digits" else None,
              "final_loss": round(sum(tail) / len(tail), 5),
              "loss_curve": curve(trainer.losses),
              "g_loss_curve": curve(trainer.history["g_loss"]) if family == "gan" else None}
    for key in RECORD_KEYS:
        record.setdefault(key, scores.get(key))
    if export_to is not None:
        export_to.mkdir(parents=True, exist_ok=True)
        card = {k: v for k, v in record.items() if not k.endswith("curve")}
        card["command"] = EXPORT_COMMAND
        trainer.export(export_to / f"{dataset}_{family}.pt", card, half=True)  # fp16 on disk, as data/ ships them
    return {k: record[k] for k in RECORD_KEYS}


def bench_compare(datasets=COMPARE_DATASETS, quick: bool = False, seeds=None, families=FAMILY_NAMES,
                  samples: int | None = None, device=None, progress: bool = True, export_to=None) -> list[dict]:
    """Every family x dataset x seed; the seed-0 models are exported to `export_to` when it is given."""
    from .samplers import Judge

    seeds = tuple(seeds if seeds is not None else (QUICK_SEEDS if quick else SEEDS))
    todo = [(d, f, s) for d in datasets for f in families for s in seeds]
    for d, f, _ in todo:
        compare_config(d, f, 0, quick)  # validates every name before any training starts
    if progress:
        from tqdm.auto import tqdm
        todo = tqdm(todo, desc="bench compare", unit="run")
    records, judges = [], {}
    for dataset, family, seed in todo:
        if progress:
            todo.set_postfix_str(f"{dataset} {family} seed {seed}")
        n = samples or default_samples(dataset, quick)
        judge = judges.setdefault(dataset, Judge(dataset, n))
        out = Path(export_to) if export_to is not None and seed == seeds[0] else None
        records.append(run_one(dataset, family, seed, quick, judge, n, device, export_to=out))
    return records


SUMMARY_METRICS = ("hq_fraction", "modes_covered", "recall", "fd", "precision", "nll", "hf_energy",
                   "ms_per_sample", "nfe", "train_seconds")


def mean_std(group: list[dict], metrics) -> dict:
    """{m: mean, m_std: sample standard deviation (0 for one value)} over the records of `group` that have metric m."""
    out = {}
    for m in metrics:
        values = [r[m] for r in group if r.get(m) is not None]
        if values:
            t = torch.tensor(values, dtype=torch.float64)
            out[m], out[f"{m}_std"] = t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)
    return out


def summarize(records: list[dict], metrics=SUMMARY_METRICS) -> list[dict]:
    """Mean and standard deviation across seeds of each metric, per (dataset, family): one row each."""
    rows = []
    for dataset, family in dict.fromkeys((r["dataset"], r["family"]) for r in records):
        group = [r for r in records if r["dataset"] == dataset and r["family"] == family]
        rows.append({"dataset": dataset, "family": family, "seeds": len(group), **mean_std(group, metrics)})
    return rows


def format_summary(records: list[dict]) -> str:
    """The summary as an aligned text table: mean ± std over seeds, one block per dataset."""
    lines = []
    rows = summarize(records)
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        block = [r for r in rows if r["dataset"] == dataset]
        keys = [m for m in SUMMARY_METRICS if any(m in r for r in block)]
        cells = [[r["family"], str(r["seeds"])] + [
            (f"{r[m]:.3g} ± {r[m + '_std']:.2g}" if m in r else "n/a") for m in keys] for r in block]
        header = ["family", "seeds"] + keys
        width = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
        unit = next(r["nll_unit"] for r in records if r["dataset"] == dataset)
        lines.append(f"{dataset} ({block[0]['seeds']} seeds; mean ± std over seeds; nll in {unit})")
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, width)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(cell, width)) for cell in cells]
        lines.append("")
    return "\n".join(lines)


def main_compare(quick: bool, json_path=None, datasets=COMPARE_DATASETS, seeds=None, samples=None, device=None,
                 force: bool = False, export_to=None) -> int:
    """The `bench compare` command: run, print the summary, optionally write the JSON records."""
    from ..checkpoints import write_json_atomic
    from .samplers import machine

    refuse_to_overwrite(json_path, force)
    start = time.perf_counter()
    records = bench_compare(datasets, quick=quick, seeds=seeds, samples=samples, device=device, export_to=export_to)
    print(format_summary(records))
    print(f"{len(records)} runs in {time.perf_counter() - start:.0f} s on {machine()}")
    if json_path is not None:
        write_json_atomic(records, Path(json_path))
        print(f"Wrote {json_path}")
    return 0


def shipped_records() -> list[dict]:
    """The full benchmark's records shipped in data/bench_compare.json."""

    from ..checkpoints import read_json, shipped_dir

    return read_json(shipped_dir() / "bench_compare.json")


def load_compared(dataset: str, family: str, folder=None):
    """A first-seed model of the comparison (data/compare/<dataset>_<family>.pt): (model, schedule or None, card)."""
    from ..checkpoints import load_model, shipped_dir
    from ..schedules import NoiseSchedule

    if dataset not in COMPARE_DATASETS or family not in FAMILY_NAMES:
        raise ValueError(f"dataset must be one of {COMPARE_DATASETS} and family one of {FAMILY_NAMES}, "
                         f"got {dataset!r} and {family!r}")
    loaded = load_model(Path(folder or shipped_dir() / "compare") / f"{dataset}_{family}.pt")
    schedule = NoiseSchedule.named(loaded.config["schedule"], loaded.config["T"]) if family == "diffusion" else None
    return loaded.model, schedule, loaded.card


def claims(records: list[dict], hf_real: float, demo: str | None = None) -> list[tuple[str, str, str]]:
    """Lesson 4's verdicts, computed from the benchmark's records: (claim, what was measured, verdict) per claim.

    `hf_real` is the high-frequency share of real test digits (the blur yardstick); `demo` an optional line about
    the live mode-collapse demonstration, appended to the mode-collapse evidence."""
    from ..train import MIXTURES

    summary = {(r["dataset"], r["family"]): r for r in summarize(records)}
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    missing = [(d, f) for d in COMPARE_DATASETS for f in FAMILY_NAMES if (d, f) not in summary]
    if missing:
        raise ValueError(f"the verdicts need every dataset x family; missing {missing}")
    mean = lambda d, f, key: summary[(d, f)][key]
    main_key = lambda d: "fd" if d == "digits" else "hq_fraction"

    def best(d, key):
        vals = {f: mean(d, f, key) for f in FAMILY_NAMES}
        return (min if key in ("fd", "nll") else max)(vals, key=vals.get)

    rows = []
    wins = [d for d in datasets if best(d, main_key(d)) == "diffusion"]
    rows.append(("Diffusion gives the best samples",
                 "best quality (hq, or FD on digits): " + ", ".join(f"{d}: {best(d, main_key(d))}" for d in datasets),
                 f"holds on {len(wins)} of {len(datasets)} datasets"))

    def coverage(f):
        runs_2d = [r for r in records if r["family"] == f and r["dataset"] in MIXTURES]
        full = sum(r["modes_covered"] == len(MIXTURES[r["dataset"]]().modes) for r in runs_2d)
        classes = [r["class_coverage"] for r in records if r["family"] == f and r["dataset"] == "digits"]
        return full, len(runs_2d), min(classes), max(classes)

    cov = {f: coverage(f) for f in FAMILY_NAMES}
    rows.append(("GANs mode-collapse",
                 "all modes in " + ", ".join(f"{f} {c[0]}/{c[1]}" for f, c in cov.items()) + " 2D runs; digit classes "
                 + ", ".join(f"{f} {c[2]}-{c[3]}" for f, c in cov.items()) + (f"; {demo}" if demo else ""),
                 ("can happen (demo, and fewer digit classes than diffusion), but no benchmark GAN lost a 2D mode"
                  if cov["gan"][0] == cov["gan"][1] else "holds in some runs")))
    ratio = mean("digits", "vae", "hf_energy") / hf_real
    least = min(FAMILY_NAMES, key=lambda f: mean("digits", f, "hf_energy")) == "vae"
    below = hf_real - mean("digits", "vae", "hf_energy") > 3 * summary[("digits", "vae")]["hf_energy_std"]
    rows.append(("VAEs are blurry",
                 f"VAE high-frequency share {ratio:.2f} x real (diffusion "
                 f"{mean('digits', 'diffusion', 'hf_energy') / hf_real:.2f} x, GAN "
                 f"{mean('digits', 'gan', 'hf_energy') / hf_real:.2f} x); 2D hq: VAE "
                 f"{mean('grid25', 'vae', 'hq_fraction'):.2f} vs diffusion {mean('grid25', 'diffusion', 'hq_fraction'):.2f}",
                 (f"holds, mildly: the VAE's samples have the least fine detail, {100 * (1 - ratio):.0f}% less than "
                  "real digits" if least and below else "does not hold at this budget")))
    slow = mean("digits", "diffusion", "ms_per_sample") / mean("digits", "gan", "ms_per_sample")
    rows.append(("Diffusion is slow to sample",
                 f"{mean('digits', 'diffusion', 'nfe'):.0f} NFE vs 1; {slow:.0f}x the GAN's time per digit (this CPU)",
                 "holds (by the number of network evaluations; lesson 3 cuts the steps, lesson 5 their cost)"))

    def spread(d, f):  # std / mean of the dataset's main quality metric across seeds
        s = summary[(d, f)]
        return s[f"{main_key(d)}_std"] / abs(s[main_key(d)]) if s[main_key(d)] else float("inf")

    stable = {d: min(FAMILY_NAMES, key=lambda f: spread(d, f)) for d in datasets}
    rows.append(("Diffusion training is more stable",
                 "seed-to-seed spread of the main metric (std / mean): " + "; ".join(
                     f"{d}: " + ", ".join(f"{f} {spread(d, f):.3f}" for f in FAMILY_NAMES) for d in datasets),
                 "smallest spread: " + ", ".join(f"{d} {f}" for d, f in stable.items())
                 + (" (holds)" if list(stable.values()).count("diffusion") > len(datasets) / 2 else
                    " (does not hold by this measure; diffusion's loss curves are the smoothest)")))
    nll_wins = [d for d in datasets if mean(d, "diffusion", "nll") < mean(d, "vae", "nll")]
    rows.append(("Diffusion has the better likelihood",
                 "upper bounds on the NLL (lower is better): " + ", ".join(
                     f"{d} diffusion {mean(d, 'diffusion', 'nll'):.2f} vs VAE {mean(d, 'vae', 'nll'):.2f}" for d in datasets),
                 f"holds on {len(nll_wins)} of {len(datasets)} datasets"))
    return rows
