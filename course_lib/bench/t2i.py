"""The text-to-image benchmark behind `python -m course_lib bench t2i`: the shipped latent (shapes_ldm) and pixel
(shapes_pixel) models on test prompts, per guidance scale, NFE and sampler.

Prompts come from the shapes test split (one object: 'a small red circle at the top left'; two objects: 'a red circle
left of a blue square') and from the held-out split (colour-shape pairs never seen in training). Each record: prompt
adherence as the shipped attribute classifier reads the images (accuracy per attribute the prompts name, 'all' of them
at once, and for two objects 'binding' and what happens to the two objects: 'present', 'swapped', 'misbound', see
`attributes.binding_breakdown`), the Frechet distance in that classifier's features to the real images the prompts
were the captions of, and the wall time. A full run repeats every configuration on three noise seeds (one trained
model each); `aggregate` gives the mean and the seed-to-seed standard deviation. `nfe` counts guided denoiser calls; with guidance (scale != 1) each is
one network call on a batch of 2B (conditional and empty caption together), `network_evals` says so. Records of kind
'train' carry each model's training cost from its card (measured while other jobs shared the machine), records of
kind 'cost' the time of one training step and one denoiser call per resolution, measured side by side in this run.
"""
from __future__ import annotations

import time

from . import refuse_to_overwrite
from .samplers import machine

SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 7.5)
QUICK_SCALES = (1.0, 3.0)
NFES = (5, 10, 20)
SAMPLERS = ("dpmpp_2m", "euler", "heun", "ddim")
SEEDS = (0, 1, 2)  # noise seeds of a full run
ACC_KEYS = ("count", "shape", "colour", "size", "position", "shape2", "colour2", "relation", "all", "binding")
BINDING_KEYS = ("present", "swapped", "misbound")
RECORD_KEYS = ("kind", "model", "space", "prompts", "sampler", "guidance", "nfe", "network_evals", "samples", "seed",
               *ACC_KEYS, *BINDING_KEYS, "fd", "seconds")
METRICS = (*ACC_KEYS, *BINDING_KEYS, "fd", "seconds")


def prompt_set(kind: str, n: int, seed: int = 0):
    """(prompts, the real images they caption): kind 'single' or 'two' from the test split, 'heldout' from the
    held-out split (unseen colour-shape pairs, one object)."""
    from ..shapes import make_shapes

    split = "heldout" if kind == "heldout" else "test"
    images, caps, _ = make_shapes(4 * n + 50, split, seed)
    keep = [i for i, c in enumerate(caps) if (" at the " in c) == (kind != "two")][:n]
    if len(keep) < n:
        raise ValueError(f"not enough {kind} prompts for n={n}")
    return [caps[i] for i in keep], images[keep]


def run_one(model, name: str, clf, kind: str, prompts, real, scale: float, nfe: int, sampler: str = "dpmpp_2m",
            seed: int = 0) -> dict:
    """One configuration on one noise seed: generate for every prompt, judge the images."""
    from ..attributes import adherence, binding_breakdown, fd

    start = time.perf_counter()
    images = model.generate(prompts, scale=scale, nfe=nfe, sampler=sampler, seed=seed)
    seconds = time.perf_counter() - start
    acc = adherence(clf, images, prompts)
    if "binding" in acc:
        acc.update({k: v for k, v in binding_breakdown(clf, images, prompts).items() if k in BINDING_KEYS})
    rec = {"kind": "sample", "model": name, "space": model.space, "prompts": kind, "sampler": sampler,
           "guidance": scale, "nfe": nfe, "network_evals": nfe * (1 if scale == 1.0 else 2), "samples": len(prompts),
           "seed": seed, **{k: acc.get(k) for k in (*ACC_KEYS, *BINDING_KEYS)}, "fd": round(fd(clf, images, real), 3),
           "seconds": round(seconds, 2)}
    return rec


def aggregate(records: list[dict]) -> list[dict]:
    """The sample records averaged over their noise seeds, one row per (model, prompts, sampler, guidance, nfe) in the
    order first run: each metric's mean, its seed-to-seed standard deviation as `<metric>_sd` (0 for one seed), and
    'seeds'. Records of other kinds are left out."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["kind"] == "sample":
            groups.setdefault((r["model"], r["prompts"], r["sampler"], r["guidance"], r["nfe"]), []).append(r)
    out = []
    for rows in groups.values():
        row = {k: rows[0][k] for k in ("kind", "model", "space", "prompts", "sampler", "guidance", "nfe",
                                        "network_evals", "samples")}
        row["seeds"] = len(rows)
        for k in METRICS:
            vals = [r[k] for r in rows if r.get(k) is not None]
            row[k] = round(statistics.fmean(vals), 4) if vals else None
            row[f"{k}_sd"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else (0.0 if vals else None)
        out.append(row)
    return out


def plan(quick: bool, space: str) -> list[tuple[str, float, int, str]]:
    """(prompt kind, scale, nfe, sampler) for one model: the latent model gets the full sweep, the pixel model (about
    fifteen times the cost per call) one-object prompts at w = 1 and 3, 20 NFE."""
    if quick:
        return [("single", s, 10, "dpmpp_2m") for s in QUICK_SCALES] + [("two", 3.0, 10, "dpmpp_2m")]
    if space == "pixel":
        return [("single", s, 20, "dpmpp_2m") for s in (1.0, 3.0)]
    out = [("single", s, n, "dpmpp_2m") for n in NFES for s in SCALES]
    out += [("two", s, 20, "dpmpp_2m") for s in SCALES]
    out += [("heldout", s, 20, "dpmpp_2m") for s in (1.0, 3.0, 5.0)]
    out += [("single", 3.0, 20, s) for s in SAMPLERS[1:]]
    return out


def summary_lines(records: list[dict]) -> list[str]:
    """The benchmark as a table: means over noise seeds (with the seed-to-seed sd of 'all' and FD), then costs."""
    head = f"{'model':<13}{'prompts':<9}{'sampler':<10}{'w':>5}{'nfe':>5}{'seeds':>6}{'shape':>7}{'colour':>7}" \
           f"{'pos':>6}{'all':>13}{'bind':>6}{'swap':>6}{'fd':>17}{'s':>7}"
    lines = [head]
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in aggregate(records):
        lines.append(f"{r['model']:<13}{r['prompts']:<9}{r['sampler']:<10}{r['guidance']:>5g}{r['nfe']:>5}"
                     f"{r['seeds']:>6}{f(r['shape']):>7}{f(r['colour']):>7}{f(r['position']):>6}"
                     f"{f(r['all']) + ' +- ' + f(r['all_sd']):>13}{f(r['binding']):>6}{f(r['swapped']):>6}"
                     f"{r['fd']:>9.1f} +- {r['fd_sd']:<5.1f}{r['seconds']:>7.1f}")
    for r in records:
        if r["kind"] == "cost":
            lines.append(f"cost {r['model']:<14}: {r['seconds_per_train_step']:.3f} s per training step of batch "
                         f"{r['batch_size']}, {r['ms_per_image_call']:.2f} ms per image per denoiser call")
    for r in records:
        if r["kind"] == "train":
            lines.append(f"train {r['model']} ({r['space']}): {r['seconds_per_step']} s per step of batch "
                         f"{r['batch_size']}, {r['train_seconds']} s in all")
    return lines


def main_t2i(quick: bool = False, json_path=None, samples: int | None = None, force: bool = False,
             models=("shapes_ldm", "shapes_pixel"), seeds=None) -> list[dict]:
    """Run the benchmark on every noise seed (SEEDS; quick: seed 0); print the table; with json_path write the records
    (refusing to overwrite without force)."""
    import torch

    from ..attributes import load_attribute_classifier
    from ..checkpoints import write_json_atomic
    from ..text2image import load_text_to_image

    refuse_to_overwrite(json_path, force)
    seeds = tuple(seeds if seeds is not None else ((0,) if quick else SEEDS))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds!r}")
    n = samples or (100 if quick else 500)
    clf = load_attribute_classifier()
    sets = {k: prompt_set(k, n) for k in ("single", "two", "heldout")}
    records = step_costs(repeats=2 if quick else 5)
    from tqdm.auto import tqdm
    with torch.no_grad():
        for name in models:
            model = load_text_to_image(name)
            c = model.card
            records.append({"kind": "train", "model": name, "space": model.space, "seconds_per_step":
                            c.get("seconds_per_step"), "batch_size": c.get("batch_size"), "steps": c.get("steps"),
                            "train_seconds": c.get("train_seconds"), "parameters": c.get("parameters"),
                            "machine": c.get("machine")})
            todo = [(seed, *cfg) for seed in seeds for cfg in plan(quick, model.space)]
            for seed, kind, scale, nfe, sampler in tqdm(todo, desc=f"bench t2i {name}"):
                prompts, real = sets[kind]
                records.append(run_one(model, name, clf, kind, prompts, real, scale, nfe, sampler, seed=seed))
    for r in records:
        r["machine"] = r.get("machine") or machine()
        r["quick"] = quick
    print("\n".join(summary_lines(records)))
    if json_path:
        write_json_atomic(records, json_path)
        print(f"Wrote {len(records)} records to {json_path}")
    return records


def step_costs(batch: int = 32, repeats: int = 5, sample_batch: int = 64) -> list[dict]:
    """What a diffusion step costs by resolution, measured here: seconds per training step (forward, backward and
    AdamW on a batch) and per sampling call of the denoiser (one image, no grad) for the pixel TextUNet at 8x8, 16x16
    and 32x32 RGB and for the latent TextUNet on 8x8x4 latents (the shipped configurations, random weights), after
    one warm-up step; the median of `repeats`."""
    import statistics

    import torch

    from ..losses import diffusion_loss
    from ..nets import TextUNet
    from ..schedules import NoiseSchedule
    from ..text2image import UNETS

    schedule = NoiseSchedule.named("cosine", 1000)
    rows = []
    for label, space, shape in (("pixel 8x8x3", "pixel", (3, 8, 8)), ("pixel 16x16x3", "pixel", (3, 16, 16)),
                                ("pixel 32x32x3", "pixel", (3, 32, 32)), ("latent 8x8x4", "latent", (4, 8, 8))):
        torch.manual_seed(0)
        net = TextUNet(in_channels=shape[0], context_dim=64, **UNETS[space])
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        ctx, mask = torch.randn(batch, 11, 64), torch.ones(batch, 11, dtype=torch.bool)
        x = torch.randn(batch, *shape)
        train = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            loss = diffusion_loss(net, x, schedule, context=ctx, mask=mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train.append(time.perf_counter() - start)
        xs = torch.randn(sample_batch, *shape)
        sctx, smask = torch.randn(sample_batch, 11, 64), torch.ones(sample_batch, 11, dtype=torch.bool)
        calls = []
        with torch.no_grad():
            for i in range(repeats + 1):
                start = time.perf_counter()
                net(xs, torch.full((sample_batch,), 500), context=sctx, mask=smask)
                calls.append(time.perf_counter() - start)
        rows.append({"kind": "cost", "model": label, "space": space, "shape": list(shape), "batch_size": batch,
                     "parameters": sum(p.numel() for p in net.parameters()),
                     "seconds_per_train_step": round(statistics.median(train[1:]), 4),
                     "ms_per_image_call": round(1000 * statistics.median(calls[1:]) / sample_batch, 3)})
    return rows


def best_scale(records: list[dict], model: str, nfe: int = 20) -> float:
    """The guidance scale lesson 7 recommends for a model: on one-object prompts at `nfe` NFE of DPM-Solver++(2M),
    the highest share of images with every attribute right (mean over seeds), ties broken by the lower FD."""
    rows = [r for r in aggregate(records) if r["model"] == model and r["prompts"] == "single"
            and r["nfe"] == nfe and r["sampler"] == "dpmpp_2m"]
    if not rows:
        raise ValueError(f"no one-object records of {model!r} at {nfe} NFE in these records")
    return max(rows, key=lambda r: (r["all"], -r["fd"]))["guidance"]


def two_object_note(model: str) -> str:
    """What lesson 7 measured about two-object prompts, from the shipped benchmark (for the model it ran)."""
    from ..checkpoints import read_json, shipped_dir

    path = shipped_dir() / "bench_t2i.json"
    rows = [r for r in aggregate(read_json(path)) if r["model"] == model and r["prompts"] == "two"]
    if not rows:
        return "Two objects: lesson 7 measures how often the model binds each colour to its shape."
    best = max(rows, key=lambda r: r["all"])
    return (f"Two objects: in lesson 7's benchmark this model draws both objects with the right colours, shapes and "
            f"arrangement in {best['all']:.0%} of samples at best (guidance {best['guidance']:g}, {best['nfe']} NFE, "
            f"{best['seeds']} seeds); expect some rows to swap or mix the colours.")
