"""Lesson 13's benchmark (`python -m course_lib bench adapt`): adapting lesson 7's text-to-shapes model, per seed.

- lora: the recommended LoRA run (course_lib.adapt.AdaptConfig's defaults) at rank 1, 4 and 8 on many images of the
  new shape, measured along training (fidelity: the concept judge reads a star on prompts naming it; drift: lesson
  7's adherence on its own prompts, against the model before);
- recipe: what each choice of the recommended run buys, at rank 4 and the same images, steps and noise: LoRA on the
  attention projections alone at two rates, on the convs too, without the prior (the recommended run is the lora
  section's rank 4);
- five: a concept from five images, four ways at the same steps, batch and noise: LoRA alone, LoRA with
  DreamBooth's prior preservation, textual inversion, and DreamBooth as its paper does it (every UNet weight, prior);
- controlnet: placement (IoU of the object's pixels with the layout map) against the plain model on the same prompts,
  and against the plain model told the position in words (lesson 7's nine places);
- inversion: DDIM inversion's reconstruction (PSNR) against steps and guidance on held-out images, and prompt edits
  (the colour named changed, shape, size and place kept, as the attribute judge reads them).
Every record says its seed; the tables give the mean and spread over seeds."""
from __future__ import annotations

import statistics

from . import report, resumable, run_tasks

SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
RANKS, MANY_IMAGES, CURVE = (1, 4, 8), 200, (200, 400, 800)  # LoRA on many images: its rank and learning curve
# textual inversion needs no prior: old prompts never contain the new word, so the prior loss cannot reach its row
FIVE = {"lora": dict(method="lora", prior_weight=0.0), "lora_prior": dict(method="lora", prior_weight=1.0),
        "textual_inversion": dict(method="textual_inversion", lr=5e-3, prior_weight=0.0),
        "full_prior": dict(method="full", lr=2e-4, prior_weight=1.0)}
FIVE_STEPS = 400
# the recommended run (attention and convs, lr 3e-3, prior) with one choice undone at a time
RECIPES = {"attention, lr 1e-3, no prior": dict(targets="attention", lr=1e-3, prior_weight=0.0),
           "attention, lr 3e-3, no prior": dict(targets="attention", lr=3e-3, prior_weight=0.0),
           "attention + convs, lr 3e-3, no prior": dict(targets="attention_conv", lr=3e-3, prior_weight=0.0)}
INVERSION_STEPS, INVERSION_SCALES = (10, 25, 50, 100), (1.0, 3.0)
CONTROLNET_STEPS = 2000
TARGETS = {"fidelity": 0.90, "old_all_drop": 0.03, "iou": 0.7, "psnr_50": 25.0}
QUICK = {"curve": (5, 10), "five_steps": 5, "controlnet_steps": 5, "inversion_steps": (5,), "prompts": 16,
         "nfe": 4, "batch_size": 4}


def _nfe(quick: bool) -> int:
    return QUICK["nfe"] if quick else 20  # lesson 7's sampling budget


def _base():
    from ..text2image import load_text_to_image

    return load_text_to_image("shapes_ldm")


def _judges():
    from ..attributes import load_attribute_classifier
    from ..concepts import load_concept_judge

    return load_concept_judge(), load_attribute_classifier()


def run_lora(seed: int, rank: int, n: int, quick: bool = False) -> list[dict]:
    """The recommended LoRA run at `rank` on MANY_IMAGES concept images, measured at each point of CURVE."""
    from ..adapt import AdaptConfig, adapt, evaluate, prior_data

    base, (judge, clf) = _base(), _judges()
    points = QUICK["curve"] if quick else CURVE
    recs = []

    def measure(step, model, seconds):
        recs.append({"section": "lora", "seed": seed, "rank": rank, "images": MANY_IMAGES, "steps": step,
                     "train_minutes": round(seconds / 60, 2), **evaluate(model, judge, clf, n, n, seed, _nfe(quick))})

    every = points[0]
    sizes = {"batch_size": QUICK["batch_size"]} if quick else {}
    config = AdaptConfig(rank=rank, images=MANY_IMAGES, steps=points[-1], seed=seed, **sizes)
    prior = prior_data(base, 16 if quick else config.prior_images, seed) if config.prior_weight else None
    model, card = adapt(base, config, progress=False, prior=prior,
                        callback=lambda s, m, t: measure(s, m, t) if s in points else None, every=every)
    measure(points[-1], model, card["train_seconds"])
    for r in recs:
        r.update(trainable=card["trainable_parameters"], trainable_share=card["trainable_share"])
    return recs


def run_recipe(seed: int, recipe: str, n: int, quick: bool = False) -> list[dict]:
    """The recommended run at rank 4 with one of its choices undone (RECIPES), on MANY_IMAGES images, CURVE[-1] steps."""
    from ..adapt import AdaptConfig, adapt, evaluate

    base, (judge, clf) = _base(), _judges()
    sizes = {"batch_size": QUICK["batch_size"]} if quick else {}
    config = AdaptConfig(images=MANY_IMAGES, steps=(QUICK["curve"] if quick else CURVE)[-1], seed=seed,
                         **RECIPES[recipe], **sizes)
    model, card = adapt(base, config, progress=False)  # no recipe here has the prior
    return [{"section": "recipe", "seed": seed, "recipe": recipe, "steps": config.steps, "images": MANY_IMAGES,
             "trainable": card["trainable_parameters"], "trainable_share": card["trainable_share"],
             "train_minutes": round(card["train_seconds"] / 60, 2), **evaluate(model, judge, clf, n, n, seed, _nfe(quick))}]


def run_five(seed: int, way: str, n: int, quick: bool = False) -> list[dict]:
    """One of the FIVE ways of teaching the concept from five images, at FIVE_STEPS."""
    from ..adapt import AdaptConfig, adapt, evaluate, prior_data

    base, (judge, clf) = _base(), _judges()
    config = AdaptConfig(images=5, steps=QUICK["five_steps"] if quick else FIVE_STEPS, seed=seed, **FIVE[way],
                         **({"batch_size": QUICK["batch_size"]} if quick else {}))
    prior = prior_data(base, 16 if quick else config.prior_images, seed) if config.prior_weight else None
    model, card = adapt(base, config, progress=False, prior=prior)
    return [{"section": "five", "seed": seed, "way": way, "steps": config.steps, "images": 5,
             "prior_weight": config.prior_weight, "trainable": card["trainable_parameters"],
             "trainable_share": card["trainable_share"], "train_minutes": round(card["train_seconds"] / 60, 2),
             **evaluate(model, judge, clf, n, n, seed, _nfe(quick))}]


def run_reference(seed: int, n: int, quick: bool = False) -> list[dict]:
    """The model before adapting, on the same prompts and noise: the drift's zero and the fidelity's floor; and the
    autoencoder's ceiling (the judge on encoded-and-decoded test stars: no latent model can do better)."""
    import torch

    from ..adapt import concept_model, evaluate
    from ..autoencoder import decode, encode
    from ..concepts import concept_adherence, make_concept

    base, (judge, clf) = _base(), _judges()
    images, captions = make_concept(n, "test", seed)
    with torch.no_grad():
        ceiling = concept_adherence(judge, decode(base.autoencoder, encode(base.autoencoder, images)), captions)
    return [{"section": "reference", "seed": seed, **evaluate(concept_model(base), judge, clf, n, n, seed, _nfe(quick)),
             "autoencoder_fidelity": ceiling["shape"], "autoencoder_all": ceiling["all"]}]


def run_controlnet(seed: int, n: int, quick: bool = False) -> list[dict]:
    from ..controlnet import placement, train_controlnet

    base = _base()
    plain = placement(base, None, n, seed)
    words = placement(base, None, n, seed, position_in_caption=True)  # the rival: lesson 7's position in words
    model, card = train_controlnet(base, steps=QUICK["controlnet_steps"] if quick else CONTROLNET_STEPS, seed=seed,
                                   progress=False)
    steered = placement(base, model, n, seed)
    return [{"section": "controlnet", "seed": seed, "steps": card["steps"], "parameters": card["parameters"],
             "train_minutes": round(card["train_seconds"] / 60, 2), "iou": steered["iou"],
             "iou_over_half": steered["iou_over_half"], "plain_iou": plain["iou"],
             "plain_iou_over_half": plain["iou_over_half"], "caption_iou": words["iou"],
             "caption_iou_over_half": words["iou_over_half"], "prompts": n}]


def run_inversion(seed: int, n: int, quick: bool = False) -> list[dict]:
    """Reconstruction of n held-out one-object images and their colour edits, per steps and guidance."""
    import torch

    from ..attributes import adherence, load_attribute_classifier
    from ..autoencoder import decode, encode
    from ..inversion import edit, psnr
    from ..shapes import make_shapes

    base, clf = _base(), load_attribute_classifier()
    images, captions, scenes = make_shapes(4 * n, "test", 100 + seed)
    one = [i for i, s in enumerate(scenes) if s["relation"] is None][:n]
    images, captions = images[one], [captions[i] for i in one]
    swap = {"red": "blue", "blue": "red", "green": "magenta", "magenta": "green", "yellow": "cyan", "cyan": "yellow"}
    targets = [" ".join(swap.get(w, w) for w in c.split()) for c in captions]
    with torch.no_grad():
        ae = decode(base.autoencoder, encode(base.autoencoder, images))
    recs = []
    for steps in QUICK["inversion_steps"] if quick else INVERSION_STEPS:
        for scale in INVERSION_SCALES:
            same = edit(base, images, captions, captions, steps=steps, scale=scale, invert_scale=scale)
            edited = edit(base, images, captions, targets, steps=steps, scale=scale, invert_scale=scale)
            judged = adherence(clf, edited, targets)
            recs.append({"section": "inversion", "seed": seed, "steps": steps, "scale": scale, "images": n,
                         "psnr": round(psnr(same, images).mean().item(), 3),
                         "psnr_autoencoder": round(psnr(ae, images).mean().item(), 3),
                         "edit_colour": judged["colour"],
                         "edit_kept": min(judged[k] for k in ("shape", "size", "position")),
                         "edit_all": judged["all"]})
    return recs


RUNS = {"reference": run_reference, "lora": run_lora, "recipe": run_recipe, "five": run_five,
        "controlnet": run_controlnet, "inversion": run_inversion}


def run_one(section: str, **task) -> list[dict]:
    return RUNS[section](**task)


def _key(t: dict) -> tuple:
    if isinstance(t, list):  # a finished run: its records
        t = t[0]
    return (t["section"], t["seed"], t.get("rank"), t.get("way"), t.get("recipe"))


def tasks_for(seeds, n: int, quick: bool) -> list[dict]:
    tasks = []
    for seed in seeds:
        tasks += [dict(section="controlnet", seed=seed, n=n, quick=quick)]
        tasks += [dict(section="lora", seed=seed, rank=r, n=n, quick=quick) for r in RANKS]
        tasks += [dict(section="recipe", seed=seed, recipe=r, n=n, quick=quick) for r in RECIPES]
        tasks += [dict(section="five", seed=seed, way=w, n=n, quick=quick) for w in FIVE]
        tasks += [dict(section="reference", seed=seed, n=n, quick=quick),
                  dict(section="inversion", seed=seed, n=n, quick=quick)]
    return tasks


def summarize(records: list[dict], section: str, by: tuple) -> list[dict]:
    """Mean and spread over seeds of every measured number, per group of `by` keys within a section; training minutes
    are the lowest seed's run only (`minutes_seed`: seeds may run on machines of different speed)."""
    rows = [r for r in records if r["section"] == section]
    out = []
    for group in dict.fromkeys(tuple(r.get(k) for k in by) for r in rows):
        members = [r for r in rows if tuple(r.get(k) for k in by) == group]
        row = {**dict(zip(by, group)), "seeds": len(members)}
        for k, v in members[0].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in by + ("seed", "train_minutes"):
                vals = [m[k] for m in members if m.get(k) is not None]
                row[k] = statistics.mean(vals)
                row[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        first = min(members, key=lambda m: m["seed"])
        if "train_minutes" in first:
            row["train_minutes"], row["minutes_seed"] = first["train_minutes"], first["seed"]
        out.append(row)
    return out


def verdict(records: list[dict]) -> dict:
    """The issue's targets against the means over seeds."""
    out = {}
    ref = summarize(records, "reference", ())
    lora = [r for r in summarize(records, "lora", ("rank", "steps")) if r["rank"] <= 8]
    five = {r["way"]: r for r in summarize(records, "five", ("way",))}
    if ref:
        out["reference_old_all"], out["autoencoder_fidelity"] = ref[0]["old_all"], ref[0]["autoencoder_fidelity"]
    if lora:
        best = max(lora, key=lambda r: (r["fidelity"], -r["steps"]))
        out.update(best_lora_rank=best["rank"], best_lora_steps=best["steps"], best_lora_fidelity=best["fidelity"],
                   best_lora_share=best["trainable_share"], fidelity_target_met=best["fidelity"] >= TARGETS["fidelity"])
    recommended = [r for r in lora if r["rank"] == 4 and r["steps"] == max(x["steps"] for x in lora)]
    if ref and recommended:  # the recommended run (prior on): the drift the target bounds
        drop = ref[0]["old_all"] - recommended[0]["old_all"]
        out.update(recommended_fidelity=recommended[0]["fidelity"], recommended_old_all_drop=drop,
                   drift_target_met=drop <= TARGETS["old_all_drop"])
    if ref and "lora_prior" in five:
        out["five_prior_old_all_drop"] = ref[0]["old_all"] - five["lora_prior"]["old_all"]
        if "lora" in five:
            out["five_no_prior_old_all_drop"] = ref[0]["old_all"] - five["lora"]["old_all"]
    cn = summarize(records, "controlnet", ())
    if cn:
        out.update(iou=cn[0]["iou"], plain_iou=cn[0]["plain_iou"], iou_target_met=cn[0]["iou"] >= TARGETS["iou"])
    inv = {(r["steps"], r["scale"]): r for r in summarize(records, "inversion", ("steps", "scale"))}
    if (50, 1.0) in inv:
        out.update(psnr_50=inv[(50, 1.0)]["psnr"], psnr_target_met=inv[(50, 1.0)]["psnr"] >= TARGETS["psnr_50"])
    return out


def table(records: list[dict], *sections: str) -> str:
    """The benchmark's lines, mean ± spread over seeds: every section, or only those named (lora, recipe, five,
    controlnet, inversion; five ends with the model before adapting)."""
    def pm(r, k, fmt=".3f"):
        return f"{r[k]:{fmt}} ± {r[k + '_std']:{fmt}}" if r["seeds"] > 1 else f"{r[k]:{fmt}}"

    want = set(sections) or {"lora", "recipe", "five", "controlnet", "inversion"}
    lines = []
    lora = summarize(records, "lora", ("rank", "steps"))
    if "lora" in want:
        lines.append("LoRA on many images: rank, steps -> fidelity (judge reads the new shape), lesson 7's prompts after")
        for r in lora:
            lines.append(f"  rank {r['rank']:>2} {r['steps']:>5} steps  fidelity {pm(r, 'fidelity')}  old prompts "
                         f"{pm(r, 'old_all')}  trainable {r['trainable_share']:.2%}  {r['train_minutes']:.1f} min")
        if lora:
            lines.append(f"  (min: the training run of seed {lora[0]['minutes_seed']} on one CPU thread; minutes depend on "
                         "the machine)")
    rank4 = [r for r in lora if r["rank"] == 4]
    lora4 = [r for r in rank4 if r["steps"] == max(x["steps"] for x in rank4)]
    recipes = summarize(records, "recipe", ("recipe",))
    if "recipe" in want and recipes:
        lines.append(f"What each choice buys (rank 4, {MANY_IMAGES} images, the same steps):")
        for r in recipes + [{**r, "recipe": "recommended: + convs, lr 3e-3, prior"} for r in lora4]:
            lines.append(f"  {r['recipe']:<38} fidelity {pm(r, 'fidelity')}  old prompts {pm(r, 'old_all')}  "
                         f"trainable {r['trainable_share']:.2%}")
    if "five" in want:
        from ..adapt import AdaptConfig

        lines.append("Five images, equal steps:")
        for r in summarize(records, "five", ("way",)):
            lr = FIVE[r["way"]].get("lr", AdaptConfig.lr)
            lines.append(f"  {r['way']:<18} lr {lr:<6g} fidelity {pm(r, 'fidelity')}  old prompts {pm(r, 'old_all')}  "
                         f"bound {pm(r, 'old_binding')}" + (f"  trainable {r['trainable']:,.0f}" if "trainable" in r else ""))
        for r in summarize(records, "reference", ()):
            lines.append(f"  {'before adapting':<28} fidelity {pm(r, 'fidelity')}  old prompts {pm(r, 'old_all')}  "
                         f"bound {pm(r, 'old_binding')}  (autoencoder's ceiling {r['autoencoder_fidelity']:.3f})")
    if "controlnet" in want:
        for r in summarize(records, "controlnet", ()):
            lines.append(f"ControlNet: IoU {pm(r, 'iou')} against the plain model's {pm(r, 'plain_iou')} without a "
                         f"position" + (f", {pm(r, 'caption_iou')} with the position in its caption"
                                        if "caption_iou" in r else ""))
    if "inversion" in want:
        for r in summarize(records, "inversion", ("steps", "scale")):
            lines.append(f"Inversion {r['steps']:>3} steps, w = {r['scale']:g}: PSNR {pm(r, 'psnr', '.2f')} dB "
                         f"(autoencoder {r['psnr_autoencoder']:.2f}); colour edits right {pm(r, 'edit_colour')}, rest "
                         f"kept {pm(r, 'edit_kept')}")
    return "\n".join(lines)


def main_adapt(quick: bool = False, json_path=None, samples: int | None = None, force: bool = False, jobs: int = 1,
               seeds=None, resume: bool = False) -> list[dict]:
    """Run the benchmark (each finished run saved to JSON_PATH.partial; --resume continues), print the table and the
    verdict; with json_path write the records (flat, one per measurement)."""
    from pathlib import Path

    done, on_record = resumable(json_path, force, resume)
    n = samples or (QUICK["prompts"] if quick else 200)
    seeds = tuple(seeds) if seeds is not None else (QUICK_SEEDS if quick else SEEDS)
    save = (lambda runs: on_record(_flat(runs))) if on_record is not None else None
    runs = run_tasks(tasks_for(seeds, n, quick), run_one, _key, jobs, _group(done), save, "bench adapt")
    records = _flat(runs)
    report(records, table(records), verdict(records), json_path)
    if json_path is not None:
        Path(f"{json_path}.partial").unlink(missing_ok=True)
    return records


def _flat(runs: list[list[dict]]) -> list[dict]:
    return [r for run in runs for r in run]


def _group(records: list[dict]) -> list[list[dict]]:
    """Flat records back into runs (one list per task key), for --resume."""
    runs: dict = {}
    for r in records:
        runs.setdefault(_key(r), []).append(r)
    return list(runs.values())
