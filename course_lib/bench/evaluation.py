"""Lesson 14's benchmark (`python -m course_lib bench evaluation`): judging models and using them responsibly.

- metrics: FD and KID between two disjoint sets of real digits against n (what a perfect model scores: FD's bias, KID
  at 0), and FD / KID / precision / recall / density / coverage of degraded real digits (blur, noise, dropped
  classes), in three feature spaces, over three resamplings (course_lib.metric_behaviour);
- alignment: CLIPScore with the mini-CLIP against the attribute judge across guidance scales of lesson 7's model
  (course_lib.text_alignment);
- memorisation: the digits preset trained on the duplicated digits set (1,000 digits once, 20 ten times, 5 a hundred
  times), its copies after 1,000, 2,000 and 4,000 steps, per seed; and the shipped digits models' copies of their
  1,500 training digits (course_lib.memorisation);
- erasure: ESD of "red" from lesson 7's model, as published and with preservation, per seed: red pixels on red
  prompts against the model before, and adherence on every other prompt, at preservation weights 0 (ESD as
  published), 1, 2 and 5 (course_lib.erasure).
Every record says its seed (or resampling); the tables give means and spreads."""
from __future__ import annotations

import shutil
import statistics

from . import report, resumable, run_tasks, runs_folder

SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
SHIPPED = ("digits", "digits_edm")  # lesson 3's and lesson 12's digits models, trained on the 1,500 train digits
CHECKPOINTS = (1000, 2000, 4000)
PRESERVE = (0.0, 1.0, 2.0, 5.0)  # ESD as published (0), and with the preservation term at three weights
TARGETS = {"red_left": 0.10, "other_drop": 0.05}  # erasure: red pixels at most 10% of before; others lose <= 5 points
QUICK = {"ns": (25, 50), "checkpoints": (10,), "copies_n": 100, "erase_steps": 4, "erase_images": 8, "prompts": 12,
         "scales": (1.0, 3.0), "nfe": 4}


def run_one(section: str, seed: int = 0, n: int = 200, quick: bool = False, name: str = "", scale: float = 0.0,
            preserve: float = 0.0, checkpoint: str | None = None) -> list[dict]:
    """One task's records (a list: a task may measure several points); `checkpoint`: where a training run saves."""
    if section == "metrics":
        from ..metric_behaviour import NS, bias_curves, sensitivity

        rows = bias_curves(QUICK["ns"] if quick else NS, 1, first=seed) + sensitivity(1, first=seed)
        return [{**r, "section": "metrics"} for r in rows]
    if section == "alignment":
        from ..text2image import load_text_to_image
        from ..text_alignment import alignment_at

        rec = alignment_at(load_text_to_image("shapes_ldm"), scale, n, QUICK["nfe"] if quick else 20, seed)
        return [{"section": "alignment", "seed": seed, **rec}]
    if section == "memorisation":
        return _memorisation(seed, QUICK["checkpoints"] if quick else CHECKPOINTS, QUICK["copies_n"] if quick else 2000,
                             quick, checkpoint)
    if section == "shipped":
        return [_shipped(name, seed, QUICK["copies_n"] if quick else 2000)]
    if section == "erasure":
        return [_erasure(seed, preserve, n, quick)]
    raise ValueError(f"unknown section {section!r}")


def _memorisation(seed: int, checkpoints, n: int, quick: bool, checkpoint: str | None) -> list[dict]:
    """Train lesson 14's digits model (the shipped digits preset's network and budget) on the duplicated digits set and
    count its copies after each number of steps in `checkpoints`: one record per point. With `checkpoint` (a path) the
    training is saved there every SAVE_EVERY steps, with the records so far, and a stopped run continues from it."""
    from ..classifier import load_classifier
    from ..data import digits_split, duplicated_digits
    from ..memorisation import measure
    from ..train import preset
    from . import SAVE_EVERY, save_run, start_or_resume

    rows, held = duplicated_digits(), digits_split("test")[0]
    features = load_classifier().features
    config = preset("digits_memorise", seed=seed, steps=max(checkpoints), **({"warmup": 2} if quick else {}))
    trainer, saved = start_or_resume(config, checkpoint)
    records = list(saved.get("records", []))
    for c in sorted(checkpoints):
        if any(r["steps"] == c for r in records):
            continue
        trainer.train(steps=c - trainer.step, progress=False,
                      callback=lambda t: save_run(t, checkpoint, records=records), every=SAVE_EVERY)
        trainer.ema.eval()
        records.append({"section": "memorisation", "kind": "memorisation", "seed": seed, "steps": c, "samples": n,
                        "train_minutes": round(trainer.elapsed / 60, 2),
                        **measure(trainer.ema, trainer.schedule, n, 1000 + seed, rows["distinct"],
                                  rows["distinct_factor"], held, features)})
        save_run(trainer, checkpoint, records=records)
    return records


def _shipped(name: str, seed: int, n: int) -> dict:
    """A shipped digits model's copies of its own 1,500 training digits (each held once)."""
    import torch

    from ..checkpoints import load_pretrained
    from ..classifier import load_classifier
    from ..data import digits_split
    from ..memorisation import measure

    p = load_pretrained(name)
    train, held = digits_split("train")[0], digits_split("test")[0]
    rec = measure(p.model, p.schedule, n, 1000 + seed, train, torch.ones(len(train), dtype=torch.long), held,
                  load_classifier().features)
    return {"section": "shipped", "name": name, "seed": seed, "samples": n, **rec}


def _erasure(seed: int, preserve: float, n: int, quick: bool) -> dict:
    from ..erasure import erase, measure_erasure
    from ..text2image import load_text_to_image

    base = load_text_to_image("shapes_ldm")
    nfe = QUICK["nfe"] if quick else 20
    sizes = {"steps": QUICK["erase_steps"], "images": QUICK["erase_images"], "batch_size": 4} if quick else {}
    before = measure_erasure(base, n, seed=seed, nfe=nfe)
    model, card = erase(base, progress=False, preserve_weight=preserve, seed=seed, **sizes)
    after = measure_erasure(model, n, seed=seed, nfe=nfe)
    return {"section": "erasure", "seed": seed, "preserve_weight": preserve, "samples": n, "steps": card["steps"],
            "train_minutes": round(card["train_seconds"] / 60, 2), "trainable": card["trainable_parameters"],
            **{f"before_{k}": v for k, v in before.items() if k != "samples"},
            **{f"after_{k}": v for k, v in after.items() if k != "samples"}}


def tasks_for(seeds, n: int, quick: bool, runs_dir=None) -> list[dict]:
    """Every task of the benchmark, the cheap ones first (their records are what a stopped run keeps soonest); with
    runs_dir, the memorisation runs save their training there as they go."""
    from ..text_alignment import SCALES
    from . import run_checkpoint

    scales = QUICK["scales"] if quick else SCALES
    tasks = [dict(section="metrics", seed=r, quick=quick) for r in (QUICK_SEEDS if quick else SEEDS)]
    tasks += [dict(section="shipped", name=m, seed=0, quick=quick) for m in SHIPPED]
    tasks += [dict(section="alignment", seed=0, n=n, scale=w, quick=quick) for w in scales]
    tasks += [dict(section="erasure", seed=s, n=n, preserve=w, quick=quick) for s in seeds for w in PRESERVE]
    tasks += [dict(section="memorisation", seed=s, quick=quick,
                   checkpoint=run_checkpoint(runs_dir, {"kind": "memorisation", "seed": s})) for s in seeds]
    return tasks


def _key(task_or_run) -> tuple:
    t = task_or_run[0] if isinstance(task_or_run, list) else task_or_run
    return (t["section"], t.get("seed", t.get("resample")), t.get("name", ""), float(t.get("scale", 0.0)),
            float(t.get("preserve", t.get("preserve_weight", 0.0))))


def _mean_sd(values) -> tuple[float, float]:
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(records: list[dict]) -> dict:
    """Erasure against the targets (mean over seeds): red pixels left on red prompts (after / before), and the drop of
    every other prompt's adherence ('all'), for ESD as published ('esd') and at each preservation weight
    ('esd_preserve_W'); `esd_recommended_weight`: of the weights within both targets, the one with the smallest drop
    (then the least red left), absent when none is within them."""
    out = {}
    for w in PRESERVE:
        rows = [r for r in records if r.get("section") == "erasure" and r["preserve_weight"] == w]
        if not rows:
            continue
        left = statistics.mean(r["after_red_pixels"] / r["before_red_pixels"] for r in rows)
        drop = statistics.mean(r["before_other_all"] - r["after_other_all"] for r in rows)
        tag = "esd" if w == 0 else f"esd_preserve_{w:g}"
        out.update({f"{tag}_red_left": left, f"{tag}_other_drop": drop,
                    f"{tag}_targets_met": left <= TARGETS["red_left"] and drop <= TARGETS["other_drop"]})
    met = [(out[f"{t}_other_drop"], out[f"{t}_red_left"], w) for w in PRESERVE
           for t in ["esd" if w == 0 else f"esd_preserve_{w:g}"] if out.get(f"{t}_targets_met")]
    if met:  # the recommendation: of the weights within both targets, the one that costs the other prompts least
        out["esd_recommended_weight"] = min(met)[2]
    return out


SECTIONS = ("bias", "sensitivity", "alignment", "shipped", "memorisation", "erasure")


def summarize_memorisation(records: list[dict], space: str = "pixels") -> list[dict]:
    """One row per training length and duplication factor: the share of samples that copy an image of that factor and
    the share of its images copied at least once, mean and spread over seeds."""
    rows = [r for r in records if r.get("section") == "memorisation"]
    out = []
    for steps in sorted({r["steps"] for r in rows}):
        group = [r for r in rows if r["steps"] == steps]
        for f in sorted((k for k in group[0][space] if k.isdigit()), key=int):
            (m, sd), (c, csd) = (_mean_sd(r[space][f][k] for r in group) for k in ("samples", "images_copied"))
            out.append({"steps": steps, "factor": int(f), "seeds": len(group), "samples": m, "samples_std": sd,
                        "images_copied": c, "images_copied_std": csd})
    return out


def summarize_erasure(records: list[dict]) -> list[dict]:
    """One row per preservation weight: red pixels left (after / before), the drop of the other prompts' adherence
    ('all'), and the judge's reading of red after, mean and spread over seeds."""
    rows = [r for r in records if r.get("section") == "erasure"]
    out = []
    for w in sorted({r["preserve_weight"] for r in rows}):
        group = [r for r in rows if r["preserve_weight"] == w]
        stats = {"red_left": [r["after_red_pixels"] / r["before_red_pixels"] for r in group],
                 "other_drop": [r["before_other_all"] - r["after_other_all"] for r in group],
                 "read_as_red": [r["after_read_as_concept"] for r in group]}
        row = {"preserve_weight": w, "seeds": len(group)}
        for k, v in stats.items():
            row[k], row[k + "_std"] = _mean_sd(v)
        out.append(row)
    return out


def table(records: list[dict], *sections: str) -> str:
    """The benchmark's tables (those of `sections`, default all) for the sections that have records."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    want = set(sections or SECTIONS)
    lines = []
    bias = [r for r in records if r.get("kind") == "bias"]
    if bias and "bias" in want:
        lines.append("two sets of real digits: FD and KID against n (mean ± sd over resamplings)")
        for f in dict.fromkeys(r["features"] for r in bias):
            for n in sorted({r["n"] for r in bias}):
                rows = [r for r in bias if r["features"] == f and r["n"] == n]
                (fd, fs), (kd, ks) = _mean_sd(r["fd"] for r in rows), _mean_sd(r["kid"] for r in rows)
                lines.append(f"  {f:<11} n {n:>4}  FD {fd:>10.4g} ± {fs:<9.3g} KID {kd:>10.3g} ± {ks:.3g}")
    sens = [r for r in records if r.get("kind") == "sensitivity"]
    if sens and "sensitivity" in want:
        lines.append("degraded real digits against real ones (classifier features; mean over resamplings)")
        for deg in dict.fromkeys(r["degradation"] for r in sens):
            for level in dict.fromkeys(r["level"] for r in sens if r["degradation"] == deg):
                rows = [r for r in sens if r["degradation"] == deg and r["level"] == level
                        and r["features"] == "classifier"]
                m = {k: statistics.mean(r[k] for r in rows) for k in ("fd", "kid", "precision", "recall", "density",
                                                                       "coverage")}
                lines.append(f"  {deg:<5} {level:<4} FD {m['fd']:>8.1f} KID {m['kid']:>8.1f} P {m['precision']:.3f} "
                             f"R {m['recall']:.3f} D {m['density']:.3f} C {m['coverage']:.3f}")
    for r in (r for r in records if r.get("section") == "alignment" and "alignment" in want):
        lines.append(f"alignment w {r['scale']:<4} CLIPScore {r['clip_score']:.1f} all {r['all']:.3f} AUC "
                     f"{r['auc']:.3f} binding {r['binding']:.3f} prefers true binding {r['prefers_true_binding']:.3f}")
    for r in (r for r in records if r.get("section") == "shipped" and "shipped" in want):
        lines.append(f"shipped {r['name']}: samples flagged as copies {r['pixels']['all']['samples']:.4f} (pixels), "
                     f"{r['features']['all']['samples']:.4f} (features); new real digits by construction 0.01")
    if "memorisation" in want:
        for r in summarize_memorisation(records):
            lines.append(f"memorisation {r['steps']:>5} steps, x{r['factor']:<3} samples copying {r['samples']:.4f} "
                         f"± {r['samples_std']:.4f}; images copied {r['images_copied']:.3f} ± "
                         f"{r['images_copied_std']:.3f} ({r['seeds']} seeds)")
    if "erasure" in want:
        for r in summarize_erasure(records):
            lines.append(f"erasure preserve {r['preserve_weight']:g}: red pixels left {r['red_left']:.3f} ± "
                         f"{r['red_left_std']:.3f}; other prompts' all-right drop {r['other_drop']:+.3f} ± "
                         f"{r['other_drop_std']:.3f}; read as red {r['read_as_red']:.2f} ({r['seeds']} seeds)")
    return "\n".join(lines)


def main_evaluation(quick: bool = False, json_path=None, samples: int | None = None, force: bool = False,
                    jobs: int = 1, seeds=None, resume: bool = False) -> list[dict]:
    """Run the benchmark (each finished task saved to JSON_PATH.partial; --resume continues), print the tables and
    the verdict; with json_path write the records (flat)."""
    from pathlib import Path

    done, on_record = resumable(json_path, force, resume)
    runs_dir = runs_folder(json_path, resume)
    n = samples or (QUICK["prompts"] if quick else 200)
    seeds = tuple(seeds) if seeds is not None else (QUICK_SEEDS if quick else SEEDS)
    groups: dict = {}
    for r in done:
        groups.setdefault(_key(r), []).append(r)
    save = (lambda runs: on_record([r for run in runs for r in run])) if on_record is not None else None
    runs = run_tasks(tasks_for(seeds, n, quick, runs_dir), run_one, _key, jobs, list(groups.values()), save,
                     "bench evaluation")
    records = [r for run in runs for r in run]
    report(records, table(records), verdict(records), json_path)
    if json_path is not None:
        Path(f"{json_path}.partial").unlink(missing_ok=True)
        shutil.rmtree(runs_dir, ignore_errors=True)
    return records
