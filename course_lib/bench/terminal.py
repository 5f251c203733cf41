"""Lesson 11's latent measurement of zero terminal SNR: lesson 7's blow-up, reproduced and fixed by v-prediction.

`python -m course_lib bench terminal [--quick] [--json PATH] [--force] [--jobs N]` trains lesson 7's latent
text-to-shapes model (train_text_to_image with the shipped model's budget: 3,500 steps, the same network, data, batch
and rate) predicting eps and predicting v, on seeds 0 1 2. Each model generates the same one-object test prompts
(guidance scale 3, DPM-Solver++(2M), 20 NFE, the same noise) starting from lesson 7's sigma_max of 20 and from the top
of its schedule (sigma 20,291: pure noise); latents are never clipped. The judge: the attribute classifier's
adherence (every attribute right) and its FD against the real images the prompts caption (lesson 7's prompt set).
"""
from __future__ import annotations

import statistics

from . import refuse_to_overwrite, report
from .arch import _run_all

PREDICTIONS = ("eps", "v")
SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
STEPS, QUICK_STEPS = 3_500, 20  # the shipped shapes_ldm's budget (data/shapes_ldm.json)
SCALE, NFE = 3.0, 20
PROMPTS, QUICK_PROMPTS = 500, 50
STARTS = ("sigma_20", "top")


def run_one(prediction: str, seed: int, prompts: int, quick: bool = False) -> dict:
    """Train one latent model and score it from both starts; one flat record."""
    from ..attributes import adherence, fd, load_attribute_classifier
    from ..text2image import SIGMA_MAX, train_text_to_image
    from .t2i import prompt_set

    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    model, card = train_text_to_image("latent", steps=QUICK_STEPS if quick else STEPS, seed=seed, progress=False,
                                      n_train=400 if quick else 20_000, prediction=prediction)
    clf = load_attribute_classifier()
    chosen, real = prompt_set("single", prompts)  # lesson 7's one-object test prompts and the images they caption
    rec = {"kind": "run", "prediction": prediction, "seed": seed, "steps": card["steps"],
           "train_seconds": card["train_seconds"], "prompts": prompts, "scale": SCALE, "nfe": NFE}
    top = float(model.schedule.sigmas[-1])
    for start, sigma_max in zip(STARTS, (SIGMA_MAX, top)):
        images = model.generate(chosen, scale=SCALE, nfe=NFE, seed=100 + seed, sigma_max=sigma_max)
        rec[f"all_{start}"] = adherence(clf, images, chosen)["all"]
        rec[f"fd_{start}"] = round(fd(clf, images, real), 3)
    rec["sigma_top"] = round(top, 1)
    return rec


def bench_terminal(quick: bool = False, prompts: int | None = None, progress: bool = True, jobs: int = 1) -> list[dict]:
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    n = prompts or (QUICK_PROMPTS if quick else PROMPTS)
    tasks = [dict(prediction=p, seed=s, prompts=n, quick=quick) for s in (QUICK_SEEDS if quick else SEEDS)
             for p in PREDICTIONS]
    return _run_all(tasks, jobs, progress, "bench terminal", fn=run_one)


def summarize(records: list[dict]) -> list[dict]:
    """Mean and spread over seeds per prediction."""
    runs = [r for r in records if r.get("kind") == "run"]
    out = []
    for p in dict.fromkeys(r["prediction"] for r in runs):
        group = [r for r in runs if r["prediction"] == p]
        row = {"prediction": p, "seeds": len(group), "steps": group[0]["steps"]}
        for k in [f"{m}_{s}" for m in ("all", "fd") for s in STARTS]:
            vals = [r[k] for r in group]
            row[k], row[k + "_std"] = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def verdict(records: list[dict]) -> dict:
    """Per prediction: FD from the top over FD from sigma 20, and adherence from the top minus from sigma 20."""
    out = {}
    for r in summarize(records):
        out[f"{r['prediction']}_fd_top_over_20"] = r["fd_top"] / r["fd_sigma_20"]
        out[f"{r['prediction']}_all_top_minus_20"] = r["all_top"] - r["all_sigma_20"]
    return out


def table(records: list[dict]) -> str:
    lines = [f"{'prediction':<10} {'seeds':>5} {'steps':>6} {'all right, from 20':>19} {'from the top':>14} "
             f"{'FD from 20':>14} {'FD from the top':>18}"]
    for r in summarize(records):
        cells = [f"{r['all_sigma_20']:.1%} ± {r['all_sigma_20_std']:.1%}", f"{r['all_top']:.1%} ± {r['all_top_std']:.1%}",
                 f"{r['fd_sigma_20']:.1f} ± {r['fd_sigma_20_std']:.1f}", f"{r['fd_top']:,.1f} ± {r['fd_top_std']:,.1f}"]
        lines.append(f"{r['prediction']:<10} {r['seeds']:>5} {r['steps']:>6} {cells[0]:>19} {cells[1]:>14} "
                     f"{cells[2]:>14} {cells[3]:>18}")
    return "\n".join(lines)


def main_terminal(quick: bool = False, json_path=None, samples: int | None = None, force: bool = False,
                  jobs: int = 1) -> list[dict]:
    """Run the benchmark, print the table and the verdict; with json_path write the records."""
    refuse_to_overwrite(json_path, force)
    records = bench_terminal(quick, samples, jobs=jobs)
    return report(records, table(records), verdict(records), json_path)
