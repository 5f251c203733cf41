"""Lesson 11's benchmark: from lesson 2's training recipe to EDM's, one change at a time, on digits.

`python -m course_lib bench recipe [--quick] [--json PATH] [--force] [--jobs N]` trains lesson 2's digits UNet with
lesson 2's budget (data, batch, steps, optimiser, EMA) under each recipe of ARMS, each change added to the one before:
lesson 2 (eps on the cosine schedule, timesteps uniform), + EDM's preconditioning, + EDM's loss weighting, + log-normal
training noise (the full EDM recipe); beside them EDM2's learned weighting, and a v-predicting lesson-2 model (zero
terminal SNR). The learning rate of each chained recipe is tuned alike (a grid extended while the best is at an edge,
on a training seed the comparison does not use); every model is sampled with DPM-Solver++(2M) on Karras levels from
sigma 80 at 10 and 35 NFE and scored by one judge (FD on the digit classifier's features). The full recipe is also
trained for half the steps; its runs keep EDM2's power EMAs, and the FD of post-hoc EMAs of several lengths is
recorded. The diffusion-family models are also sampled from the top of their schedule (sigma 20,291: pure noise).
"""
from __future__ import annotations

import copy
import statistics

import torch

from . import refuse_to_overwrite, report
from .arch import MAX_EXTENSIONS, _extend, _run_all

ARMS = {
    "lesson2": dict(family="diffusion"),
    "precond": dict(family="edm", precond="edm", noise="uniform_t", loss_weight="eps"),
    "weighting": dict(family="edm", precond="edm", noise="uniform_t", loss_weight="edm"),
    "edm": dict(family="edm", precond="edm", noise="lognormal", loss_weight="edm"),
    "learned": dict(family="edm", precond="edm", noise="lognormal", loss_weight="edm", learned_weight=True),
    "v": dict(family="diffusion", prediction="v"),
}
CHAIN = ("lesson2", "precond", "weighting", "edm")  # one change at a time; each tuned alike
BORROWS = {"learned": "edm", "v": "lesson2"}  # these two use the tuned rate of the recipe they change
LABELS = {"lesson2": "lesson 2 (eps, uniform t)", "precond": "+ EDM preconditioning", "weighting": "+ EDM weighting",
          "edm": "+ log-normal sigma (EDM)", "learned": "EDM + learned weighting", "v": "lesson 2 with v-prediction"}
DIGITS_STD = 0.75  # the digits' standard deviation (0.752 over the training set): EDM's sigma_data is the data's std
EXPORTED = {"edm": "digits_edm", "v": "digits_v"}  # the first seed's models of these recipes ship (data/)
SEEDS, QUICK_SEEDS, TUNE_SEED = (0, 1, 2), (0,), 10
LRS, QUICK_LRS = (1e-3, 3e-3), (1e-3,)
NFES = (10, 35)
QUICK_STEPS = 30
SAMPLER, SIGMA_MAX, SIGMA_MIN = "dpmpp_2m", 80.0, 0.002
POSTHOC_SIGMA_REL = (0.03, 0.05, 0.08, 0.12, 0.2)
SNAPSHOT_EVERY = 500
LOSS_SIGMAS = tuple(round(v, 4) for v in torch.logspace(-2.5, 1.9, 12).tolist())  # 0.003 .. 79


def train_config(arm: str, seed: int, lr: float, steps: int | None = None, quick: bool = False):
    """Lesson 2's digits preset with the arm's recipe, seed, rate and (optionally) step count."""
    from ..train import preset

    if arm not in ARMS:
        raise ValueError(f"unknown recipe {arm!r}; choose one of {list(ARMS)}")
    extra = {"steps": steps} if steps is not None else {}
    if quick:
        extra = {"steps": steps or QUICK_STEPS, "warmup": 5}
    sigma_data = {"sigma_data": DIGITS_STD} if ARMS[arm]["family"] == "edm" else {}
    return preset("digits", seed=seed, lr=lr, **ARMS[arm], **sigma_data, **extra)


def score(model, schedule, judge, n: int, nfe: int, seed: int, top: bool = False, clip: float | None = 1.0) -> float:
    """FD of n samples: DPM-Solver++(2M), nfe Karras levels from sigma 80 (top=True: from the schedule's last level),
    each estimate of x0 clipped to [-1, 1] (clip=None: not clipped, as for latents, lesson 7)."""
    from ..samplers import as_denoiser, karras_sigmas, sample

    g = torch.Generator().manual_seed(seed)
    den = as_denoiser(model, schedule)
    hi = den.sigma_max if top else min(den.sigma_max, SIGMA_MAX)
    sigmas = karras_sigmas(nfe, max(den.sigma_min, SIGMA_MIN), hi)
    with torch.no_grad():
        x = sample(den, torch.randn(n, 1, 8, 8, generator=g), sampler=SAMPLER, sigmas=sigmas, clip=clip).x
    return judge(x.clamp(-1, 1))["fd"]


def run_one(arm: str, seed: int, regime: str, lr: float, n: int, steps: int | None = None, quick: bool = False,
            posthoc: bool = False, export: str | None = None) -> dict:
    """Train one recipe, score it at every NFE (and from the top, and post-hoc EMAs where asked); one flat record.
    `export`: also write the trained model there (Trainer.export: EMA weights and config)."""
    from ..data import digits_split
    from ..edm import loss_by_sigma
    from ..posthoc_ema import PowerEMA
    from ..samplers import as_denoiser
    from ..train import Trainer
    from .samplers import Judge

    judge = Judge("digits", n)
    trainer = Trainer(train_config(arm, seed, lr, steps, quick))
    ema = PowerEMA(trainer.model) if posthoc else None

    def callback(t):
        ema(t)
        if t.step % SNAPSHOT_EVERY == 0 or t.step == t.config.steps:
            ema.snapshot()

    trainer.train(progress=False, callback=callback if posthoc else None, every=1)
    if export is not None:
        trainer.export(export)
    model, schedule = trainer.ema.eval(), trainer.schedule
    rec = {"kind": "run", "arm": arm, "recipe": LABELS[arm], "regime": regime, "seed": seed, "lr": lr,
           "steps": trainer.step, "train_seconds": round(trainer.elapsed, 1), "samples": n, "sampler": SAMPLER}
    for nfe in NFES:
        rec[f"fd_{nfe}"] = score(model, schedule, judge, n, nfe, 1000 + seed)
    if ARMS[arm]["family"] == "diffusion":  # sampling from the schedule's last level (pure noise, sigma 20,291)
        rec["fd_35_top"] = score(model, schedule, judge, n, NFES[-1], 1000 + seed, top=True)
        for top in (False, True):  # without clipping the x0 estimates (what latents get): does the start still work?
            rec["fd_35_top_noclip" if top else "fd_35_noclip"] = score(model, schedule, judge, n, NFES[-1], 1000 + seed,
                                                                       top=top, clip=None)
        rec["sigma_top"] = round(as_denoiser(model, schedule).sigma_max, 1)
    test = digits_split("test")[0]
    den = as_denoiser(model, schedule)
    rec["loss_sigmas"] = list(LOSS_SIGMAS)
    rec["mse_by_sigma"] = [round(v, 6) for v in loss_by_sigma(den, test, LOSS_SIGMAS, seed=seed).tolist()]
    tail = trainer.losses[-(len(trainer.losses) // 20 + 1):]
    rec["final_loss"] = round(sum(tail) / len(tail), 5)
    if posthoc:
        fds, copy_ = {}, copy.deepcopy(model)
        for sr in POSTHOC_SIGMA_REL:
            copy_.load_state_dict(ema.reconstruct(sr))
            fds[str(sr)] = score(copy_, schedule, judge, n, NFES[-1], 1000 + seed)
        copy_.load_state_dict(trainer.model.state_dict())
        rec["fd_posthoc"], rec["fd_no_ema"] = fds, score(copy_, schedule, judge, n, NFES[-1], 1000 + seed)
        rec["ema_decay"] = trainer.config.ema_decay
    return rec


def _pool(tasks: list[dict], jobs: int, progress: bool, desc: str) -> list[dict]:
    """run_one for every task, in `jobs` processes of one thread each when jobs > 1 (lesson 8's pool); input order."""
    return _run_all(tasks, jobs, progress, desc, fn=run_one)


def tuned_lr(records: list[dict], arm: str) -> float:
    """The rate of the tuning run of `arm` (or of the recipe it borrows from) with the lowest FD at 35 NFE."""
    key = BORROWS.get(arm, arm)
    tune = [r for r in records if r.get("regime") == "tune" and r["arm"] == key]
    if not tune:
        raise ValueError(f"no tuning runs of {key} in the records")
    return min(tune, key=lambda r: r[f"fd_{NFES[-1]}"])["lr"]


def bench_recipe(quick: bool = False, samples: int | None = None, progress: bool = True, jobs: int = 1,
                 export_dir=None) -> list[dict]:
    """Tune the chain's rates, then every arm on every seed (and the full recipe at half the steps); with export_dir
    the first seed's models of EXPORTED are written there (what data/ ships)."""
    from ..train import preset
    from .samplers import Judge

    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    n = samples or (200 if quick else 1000)
    ref = Judge("digits", n).real_floor()
    records = [{"kind": "reference", "arm": "held-out real digits", "samples": ref["samples"], "fd": ref["fd"]}]
    grids = {a: list(QUICK_LRS if quick else LRS) for a in CHAIN}
    todo = [(a, lr) for a in CHAIN for lr in grids[a]]
    for _ in range(MAX_EXTENSIONS + 1):
        records += _pool([dict(arm=a, seed=TUNE_SEED, regime="tune", lr=lr, n=n, quick=quick) for a, lr in todo],
                         jobs, progress, "bench recipe: tuning")
        todo = [] if quick else [(a, nxt) for a in CHAIN if (nxt := _extend(grids[a], tuned_lr(records, a))) is not None]
        for a, lr in todo:
            grids[a].append(lr)
        if not todo:
            break
    seeds = QUICK_SEEDS if quick else SEEDS
    steps = preset("digits").steps
    runs = [dict(arm=a, seed=s, regime="equal_steps", lr=tuned_lr(records, a), n=n, quick=quick, posthoc=a == "edm",
                 export=f"{export_dir}/{EXPORTED[a]}.pt" if export_dir and s == seeds[0] and a in EXPORTED else None)
            for s in seeds for a in ARMS]
    runs += [dict(arm="edm", seed=s, regime="half_steps", lr=tuned_lr(records, "edm"), n=n, quick=quick,
                  steps=max(1, (QUICK_STEPS if quick else steps) // 2)) for s in seeds]
    return records + _pool(runs, jobs, progress, "bench recipe")


def summarize(records: list[dict]) -> list[dict]:
    """Mean and spread over seeds per (arm, regime)."""
    runs = [r for r in records if r.get("kind") == "run" and r["regime"] != "tune"]
    out = []
    for key in dict.fromkeys((r["arm"], r["regime"]) for r in runs):
        group = [r for r in runs if (r["arm"], r["regime"]) == key]
        row = {"arm": key[0], "recipe": LABELS[key[0]], "regime": key[1], "seeds": len(group), "lr": group[0]["lr"],
               "steps": group[0]["steps"]}
        for k in [f"fd_{nfe}" for nfe in NFES] + ["fd_35_top", "fd_35_noclip", "fd_35_top_noclip"]:
            vals = [r[k] for r in group if r.get(k) is not None]
            if vals:
                row[k] = statistics.mean(vals)
                row[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def verdict(records: list[dict]) -> dict:
    """The issue's questions, answered from the records: does the full recipe beat lesson 2's by 20% at equal steps,
    or match it in half the steps; does sampling from pure noise work for the v model and not the eps model."""
    rows = {(r["arm"], r["regime"]): r for r in summarize(records)}
    base, full = rows.get(("lesson2", "equal_steps")), rows.get(("edm", "equal_steps"))
    half = rows.get(("edm", "half_steps"))
    out = {}
    key = f"fd_{NFES[-1]}"
    if base and full:
        out["edm_over_lesson2"] = full[key] / base[key]
        out["beats_by_20pct"] = full[key] <= 0.8 * base[key]
    if base and half:
        out["half_steps_over_lesson2"] = half[key] / base[key]
        out["matches_in_half"] = half[key] <= base[key]
    for arm in ("lesson2", "v"):
        r = rows.get((arm, "equal_steps"))
        if r and "fd_35_top" in r:
            out[f"{arm}_top_over_tuned"] = r["fd_35_top"] / r[key]
    return out


def table(records: list[dict]) -> str:
    lines = [f"learning-rate tuning (training seed {TUNE_SEED}, FD at {NFES[-1]} NFE):"]
    for arm in CHAIN:
        tune = sorted((r for r in records if r.get("regime") == "tune" and r["arm"] == arm), key=lambda r: r["lr"])
        if tune:
            lines.append(f"  {LABELS[arm]:<28}" + "  ".join(f"lr {r['lr']:g}: {r[f'fd_{NFES[-1]}']:.1f}" for r in tune))
    lines.append(f"{'recipe':<28} {'regime':<12} {'lr':>6} {'steps':>6} " +
                 " ".join(f"{'FD ' + str(nfe) + ' NFE':>16}" for nfe in NFES) + f" {'FD from top':>16}")
    for r in summarize(records):
        cells = [f"{r[f'fd_{nfe}']:.1f} ± {r[f'fd_{nfe}_std']:.1f}" for nfe in NFES]
        top = f"{r['fd_35_top']:.1f} ± {r['fd_35_top_std']:.1f}" if "fd_35_top" in r else "-"
        lines.append(f"{r['recipe']:<28} {r['regime']:<12} {r['lr']:>6g} {r['steps']:>6} "
                     + " ".join(f"{c:>16}" for c in cells) + f" {top:>16}")
    ref = next((r for r in records if r.get("kind") == "reference"), None)
    if ref:
        lines.append(f"held-out real digits scored like samples: FD {ref['fd']:.1f} (n = {ref['samples']})")
    return "\n".join(lines)


def main_recipe(quick: bool = False, json_path=None, samples: int | None = None, force: bool = False,
                jobs: int = 1, export_dir=None) -> list[dict]:
    """Run the benchmark, print the table and the verdict; with json_path write the records."""
    refuse_to_overwrite(json_path, force)
    records = bench_recipe(quick, samples, jobs=jobs, export_dir=export_dir)
    return report(records, table(records), verdict(records), json_path)
