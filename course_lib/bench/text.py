"""Lesson 10's benchmark: masked diffusion against the autoregressive baseline on lesson 7's captions.

For the shipped `captions_mdlm` and `captions_ar` (one transformer size, data, batch, steps and learning rate), and the
exact denoiser of the training corpus (what a perfect network would do): validity, distinct and unseen valid captions
per sampler order and number of denoising steps, with wall time; bits per token on test captions (the diffusion
model's bound, the AR model's exact NLL); infilling the middle of test captions. Records are flat dicts.
"""
from __future__ import annotations

import math
import time

import torch

from . import refuse_to_overwrite

STEPS = (1, 2, 3, 5, 10, 20, 50)
QUICK_STEPS = (2, 5, 10)
GAP = (2, 5)          # infilling: positions 2, 3, 4 of each test caption are masked and filled
# every record carries the keys model, steps, validity, distinct, bits_per_token, seconds; a likelihood record
# samples nothing, so its sampling keys are None
NOT_SAMPLED = {"steps": None, "validity": None, "distinct": None, "seconds": None}


def _models():
    from ..checkpoints import Loaded
    from ..data import DataSource
    from ..text_models import ExactDenoiser, load_text_model

    source = DataSource("captions")
    corpus = Loaded(ExactDenoiser(source.tokens), {"family": "masked_diffusion", "masking": "linear"}, {})
    return {"masked_diffusion": load_text_model("captions_mdlm"), "autoregressive": load_text_model("captions_ar"),
            "exact corpus denoiser": corpus}, set(source.texts)


def _sample_record(name, loaded, training, n, steps, order, seed, bits) -> dict:
    from ..captions import text_quality
    from ..text_models import generate

    start = time.perf_counter()
    tokens = generate(loaded, n, steps=steps, order=order, seed=seed)
    seconds = time.perf_counter() - start
    q = text_quality(tokens, training)
    return {"kind": "sample", "model": name, "order": order, "steps": steps, "seed": seed, "samples": n,
            "validity": q["validity"], "distinct": q["distinct"], "unseen": q["unseen"], "bits_per_token": bits,
            "seconds": round(seconds, 4)}


def _stderr(values: torch.Tensor) -> float:
    return float(values.std() / math.sqrt(len(values)))


def bench_text(quick: bool = False, samples: int | None = None, seeds=None) -> list[dict]:
    """Every record of the benchmark (see the module's docstring)."""
    from ..captions import MASK_ID, caption_corpus, decode, is_valid
    from ..text_models import autoregressive_nll, bits_per_token, generate, masked_bound

    n = samples or (200 if quick else 1000)
    seeds = seeds or ((0,) if quick else (0, 1, 2))
    models, training = _models()
    test, _ = caption_corpus(n, "test", seed=1)
    length = test.shape[1]
    records, bits, per_token = [], {}, {}
    with torch.no_grad():
        for name in ("masked_diffusion", "autoregressive"):
            loaded = models[name]
            if name == "autoregressive":
                nats = autoregressive_nll(loaded.model, test)
                what = "exact NLL"
            else:
                nats = masked_bound(loaded.model, test, n_t=16 if quick else 64, seed=0)
                what = "bound (negative ELBO)"
            per_token[name] = nats / length / math.log(2)
            bits[name] = bits_per_token(nats, length)
            records.append({"kind": "nll", "model": name, "what": what, "bits_per_token": round(bits[name], 4),
                            "stderr": round(_stderr(per_token[name]), 4), "captions": len(test), **NOT_SAMPLED})
        gap = per_token["masked_diffusion"] - per_token["autoregressive"]  # paired: the same captions
        records.append({"kind": "nll_gap", "model": "masked_diffusion - autoregressive",
                        "bits_per_token": round(float(gap.mean()), 4), "stderr": round(_stderr(gap), 4),
                        "ratio": round(bits["masked_diffusion"] / bits["autoregressive"], 4), "captions": len(test),
                        **NOT_SAMPLED})
        for seed in seeds:
            for name in ("masked_diffusion", "exact corpus denoiser"):
                orders = ("random", "confidence") if quick else ("random", "confidence", "ancestral")
                for order in orders:
                    for steps in (QUICK_STEPS if quick else STEPS):
                        if name != "masked_diffusion" and (order != "random" or steps > 10):
                            continue  # the exact denoiser: one row, enough to tell the network's errors apart
                        records.append(_sample_record(name, models[name], training, n, steps, order, seed,
                                                      bits.get(name)))
            records.append(_sample_record("autoregressive", models["autoregressive"], training, n, length, "left to right",
                                          seed, bits["autoregressive"]))
            prompt = test.clone()
            prompt[:, GAP[0]:GAP[1]] = MASK_ID
            for name in ("masked_diffusion", "autoregressive"):
                start = time.perf_counter()
                filled = generate(models[name], n, steps=GAP[1] - GAP[0], seed=seed, prompt=prompt)
                texts = decode(filled)
                valid = [t for t in texts if is_valid(t)]
                records.append({"kind": "infill", "model": name, "seed": seed, "samples": n,
                                "masked": f"positions {GAP[0]}..{GAP[1] - 1}",
                                "steps": GAP[1] - GAP[0], "validity": len(valid) / n, "distinct": len(set(valid)),
                                "bits_per_token": bits[name],
                                "changed": float((filled != test).any(1).double().mean()),
                                "seconds": round(time.perf_counter() - start, 4)})
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Sample records averaged over seeds per (model, order, steps): mean validity, distinct, unseen, seconds."""
    groups = {}
    for r in records:
        if r["kind"] == "sample":
            groups.setdefault((r["model"], r["order"], r["steps"]), []).append(r)
    out = []
    for (model, order, steps), rs in groups.items():
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("validity", "distinct", "unseen", "seconds")}
        out.append({"model": model, "order": order, "steps": steps, "seeds": len(rs), **mean,
                    "validity_min": min(r["validity"] for r in rs), "validity_max": max(r["validity"] for r in rs)})
    return out


def best(records: list[dict], model: str = "masked_diffusion") -> dict:
    """A model's best row of `summarize` by mean validity (the fewest steps among ties)."""
    rows = [r for r in summarize(records) if r["model"] == model]
    return max(rows, key=lambda r: (r["validity"], -r["steps"]))


def verdict(records: list[dict]) -> list[str]:
    """What lesson 10 concludes from the benchmark, one sentence per line: how valid masked diffusion's captions get at
    its best step count beside the AR model's, and its likelihood bound against the AR model's exact NLL."""
    b = best(records)
    nll = {r["model"]: r for r in records if r["kind"] == "nll"}
    md, ar = nll["masked_diffusion"]["bits_per_token"], nll["autoregressive"]["bits_per_token"]
    gap = next(r for r in records if r["kind"] == "nll_gap")
    ar_valid = best(records, "autoregressive")["validity"]
    z = abs(gap["bits_per_token"]) / gap["stderr"] if gap["stderr"] else float("inf")
    lines = [f"masked diffusion writes {b['validity']:.1%} valid captions at its best, {b['steps']} steps in "
             f"{b['order']} order; the autoregressive model {ar_valid:.1%}",
             f"bits per token: diffusion bound {md:.3f}, autoregressive NLL {ar:.3f} (ratio {md / ar:.3f}); paired "
             f"difference {gap['bits_per_token']:+.4f} +- {gap['stderr']:.4f}, {z:.1f} standard errors from zero: "
             + ("no gap between the bound and the exact NLL is measurable here" if z < 2 else
                ("the bound is below the AR model's NLL" if gap["bits_per_token"] < 0 else
                 "the bound is above the AR model's NLL"))]
    for name in ("masked_diffusion", "autoregressive"):
        rs = [r for r in records if r["kind"] == "infill" and r["model"] == name]
        if rs:
            lines.append(f"infilling {rs[0]['masked']}: {name} {sum(r['validity'] for r in rs) / len(rs):.1%} valid")
    return lines


def table(records: list[dict]) -> str:
    """Validity (distinct) per model, order and step count, mean over seeds, with seconds per batch."""
    lines = [f"{'model':<24} {'order':<14} {'steps':>5} {'validity':>9} {'distinct':>9} {'unseen':>7} {'seconds':>8}"]
    for r in summarize(records):
        lines.append(f"{r['model']:<24} {r['order']:<14} {r['steps']:>5} {r['validity']:>9.3f} {r['distinct']:>9.1f} "
                     f"{r['unseen']:>7.1f} {r['seconds']:>8.3f}")
    for r in records:
        if r["kind"] == "nll":
            lines.append(f"{r['model']}: {r['bits_per_token']:.4f} +- {r['stderr']:.4f} bits per token ({r['what']}, "
                         f"{r['captions']} test captions)")
    return "\n".join(lines)


def main_text(quick: bool = False, json_path=None, samples: int | None = None, force: bool = False) -> list[dict]:
    """Run the benchmark; print the table and the verdict; with json_path write the records."""
    from ..checkpoints import write_json_atomic

    refuse_to_overwrite(json_path, force)
    records = bench_text(quick, samples)
    print(table(records))
    print("\n".join(verdict(records)))
    if json_path:
        write_json_atomic(records, json_path)
        print(f"wrote {json_path}")
    return records
