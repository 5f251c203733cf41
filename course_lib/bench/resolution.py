"""Lesson 11's resolution benchmark: does a larger image need its training noise shifted up (simple diffusion, SD3)?

`python -m course_lib bench resolution [--quick] [--json PATH] [--force] [--jobs N]` trains one UNet (the same
network, batch, steps and rate everywhere) with EDM's recipe on the shapes images at 32x32 and at 16x16 (the same
images, 2x2-averaged), each with its training sigmas as EDM draws them (shift 1) and multiplied by 2 (shift 2, the
d / d_base of a 32x32 image against a 16x16 base). Every model is sampled with DPM-Solver++(2M) on the same Karras
levels from sigma 80 and scored by one judge: the Frechet distance on the shipped attribute classifier's features
(16x16 images and their references are enlarged 2x by repeating pixels first). The resolution shift predicts that
shift 2 helps the 32x32 model more than it helps the 16x16 one.
"""
from __future__ import annotations

import statistics

import torch

from . import refuse_to_overwrite, report
from .arch import _run_all

RESOLUTIONS = ("shapes16", "shapes32")
SHIFTS = (1.0, 2.0)
SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
STEPS, QUICK_STEPS = 3_000, 30
LR, BATCH = 1e-3, 64  # EDM's tuned digits rate (bench recipe), not tuned again here: one rate for every arm
MODEL = {"kind": "unet", "base": 16, "mults": [1, 2, 2], "num_res": 1}  # 281k parameters at either resolution
SHAPES_STD = {"shapes32": 0.31, "shapes16": 0.29}  # the training images' std (0.312 and 0.294): EDM's sigma_data
NFES = (10, 35)
SAMPLER, SIGMA_MAX, SIGMA_MIN = "dpmpp_2m", 80.0, 0.002
REFERENCE_N = 2_000
LOSS_SIGMAS = tuple(round(v, 4) for v in torch.logspace(-2.5, 1.9, 12).tolist())  # 0.003 .. 79


def train_config(data: str, shift: float, seed: int, quick: bool = False):
    """EDM's recipe (edm family defaults) on one resolution of the shapes images, training sigmas times `shift`."""
    from ..train import TrainConfig

    if data not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {data!r}; choose one of {RESOLUTIONS}")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or shift <= 0:
        raise ValueError(f"shift must be a number > 0, got {shift!r}")
    return TrainConfig(data=data, family="edm", model=dict(MODEL), sigma_data=SHAPES_STD[data], sigma_shift=float(shift),
                       batch_size=BATCH, lr=LR, steps=QUICK_STEPS if quick else STEPS, warmup=5 if quick else 100,
                       seed=seed)


def to_judge(images: torch.Tensor) -> torch.Tensor:
    """Images as the 32x32 judge reads them: 16x16 ones enlarged 2x by repeating each pixel, values clamped to [-1, 1]."""
    images = images.clamp(-1, 1)
    return images.repeat_interleave(2, -1).repeat_interleave(2, -2) if images.shape[-1] == 16 else images


def reference(data: str, n: int = REFERENCE_N, seed: int = 0) -> torch.Tensor:
    """Held-out shapes images (the test split) at the resolution of `data`, as the judge reads them."""
    from ..data import shapes_images

    return to_judge(shapes_images(n, data, "test", seed))


def score(model, data: str, clf, ref: torch.Tensor, n: int, nfe: int, seed: int) -> float:
    """FD (attribute classifier features) of n samples: DPM-Solver++(2M), nfe Karras levels from sigma 80."""
    from ..attributes import fd
    from ..samplers import as_denoiser, karras_sigmas, sample

    g = torch.Generator().manual_seed(seed)
    side = 16 if data == "shapes16" else 32
    sigmas = karras_sigmas(nfe, SIGMA_MIN, SIGMA_MAX)
    with torch.no_grad():
        x = sample(as_denoiser(model), torch.randn(n, 3, side, side, generator=g), sampler=SAMPLER, sigmas=sigmas,
                   clip=1.0).x
    return fd(clf, to_judge(x), ref)


def run_one(data: str, shift: float, seed: int, n: int, quick: bool = False) -> dict:
    """Train one (resolution, shift) model and score it; one flat record."""
    from ..attributes import fd, load_attribute_classifier
    from ..data import shapes_images
    from ..edm import loss_by_sigma
    from ..samplers import as_denoiser
    from ..train import Trainer

    clf = load_attribute_classifier()
    ref = reference(data, 200 if quick else REFERENCE_N)
    trainer = Trainer(train_config(data, shift, seed, quick))
    trainer.train(progress=False)
    model = trainer.ema.eval()
    rec = {"kind": "run", "data": data, "shift": shift, "seed": seed, "lr": LR, "steps": trainer.step,
           "train_seconds": round(trainer.elapsed, 1), "samples": n, "sampler": SAMPLER}
    for nfe in NFES:
        rec[f"fd_{nfe}"] = round(score(model, data, clf, ref, n, nfe, 1000 + seed), 4)
    test = shapes_images(100 if quick else 500, data, "test", seed=1)
    rec["loss_sigmas"] = list(LOSS_SIGMAS)
    rec["mse_by_sigma"] = [round(v, 6) for v in loss_by_sigma(as_denoiser(model), test, LOSS_SIGMAS, seed=seed).tolist()]
    tail = trainer.losses[-(len(trainer.losses) // 20 + 1):]
    rec["final_loss"] = round(sum(tail) / len(tail), 5)
    if seed == 0:  # what a perfect model would score at this n: held-out real images of another seed
        rec["fd_real"] = round(fd(clf, reference(data, n, seed=2), ref), 4)
    return rec


def bench_resolution(quick: bool = False, samples: int | None = None, progress: bool = True, jobs: int = 1) -> list[dict]:
    """Every (resolution, shift) on every seed, the 32x32 runs first (they take longest)."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    n = samples or (100 if quick else 1000)
    tasks = [dict(data=d, shift=s, seed=seed, n=n, quick=quick) for d in reversed(RESOLUTIONS) for seed in
             (QUICK_SEEDS if quick else SEEDS) for s in SHIFTS]
    return _run_all(tasks, jobs, progress, "bench resolution", fn=run_one)


def summarize(records: list[dict]) -> list[dict]:
    """Mean and spread over seeds per (resolution, shift)."""
    runs = [r for r in records if r.get("kind") == "run"]
    out = []
    for key in dict.fromkeys((r["data"], r["shift"]) for r in runs):
        group = [r for r in runs if (r["data"], r["shift"]) == key]
        row = {"data": key[0], "shift": key[1], "seeds": len(group), "steps": group[0]["steps"]}
        for k in [f"fd_{nfe}" for nfe in NFES]:
            vals = [r[k] for r in group]
            row[k] = statistics.mean(vals)
            row[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        real = [r["fd_real"] for r in group if "fd_real" in r]
        if real:
            row["fd_real"] = real[0]
        out.append(row)
    return out


def verdict(records: list[dict]) -> dict:
    """FD with shift 2 over FD with shift 1 (35 NFE) at each resolution, per seed pair and on the means: the shift
    'helps the larger image more' when the 32x32 ratio is below the 16x16 one."""
    key = f"fd_{NFES[-1]}"
    rows = {(r["data"], r["shift"]): r for r in summarize(records)}
    out = {}
    for data in RESOLUTIONS:
        a, b = rows.get((data, SHIFTS[0])), rows.get((data, SHIFTS[1]))
        if a and b:
            out[f"{data}_shift_ratio"] = b[key] / a[key]
            runs = {(r["shift"], r["seed"]): r[key] for r in records if r.get("kind") == "run" and r["data"] == data}
            pairs = [runs[(SHIFTS[1], s)] / runs[(SHIFTS[0], s)] for (sh, s) in runs if sh == SHIFTS[0]
                     and (SHIFTS[1], s) in runs]
            out[f"{data}_seed_ratios"] = [round(p, 3) for p in pairs]
    if len(out) == 2 * len(RESOLUTIONS):
        out["shift_helps_larger_more"] = out["shapes32_shift_ratio"] < out["shapes16_shift_ratio"]
    return out


def table(records: list[dict]) -> str:
    lines = [f"{'resolution':<11} {'shift':>5} {'seeds':>5} {'steps':>6} " +
             " ".join(f"{'FD ' + str(nfe) + ' NFE':>16}" for nfe in NFES) + f" {'real images':>12}"]
    for r in summarize(records):
        cells = [f"{r[f'fd_{nfe}']:.2f} ± {r[f'fd_{nfe}_std']:.2f}" for nfe in NFES]
        real = f"{r['fd_real']:.2f}" if "fd_real" in r else "-"
        lines.append(f"{r['data']:<11} {r['shift']:>5g} {r['seeds']:>5} {r['steps']:>6} "
                     + " ".join(f"{c:>16}" for c in cells) + f" {real:>12}")
    return "\n".join(lines)


def main_resolution(quick: bool = False, json_path=None, samples: int | None = None, force: bool = False,
                    jobs: int = 1) -> list[dict]:
    """Run the benchmark, print the table and the verdict; with json_path write the records."""
    refuse_to_overwrite(json_path, force)
    records = bench_resolution(quick, samples, jobs=jobs)
    return report(records, table(records), verdict(records), json_path)
