"""The guidance benchmark behind `python -m course_lib bench guidance`: guided digits, per method and scale.

Classifier-free guidance on the shipped `digits_cond` model (plain, on a noise interval, with rescale) and classifier
guidance of the unconditional `digits` model by the shipped noise-aware classifier, all sampled with the default
sampler (DPM-Solver++(2M)) on the same noise levels (the digits model's tuned ones) at the same NFE from the same
noise, labels 0..9 in turn. Each record: label accuracy (by the shipped clean
digits classifier, which the guidance never sees), FD / precision / recall against the real training digits in that
classifier's features (course_lib.bench.samplers.Judge), and per-class diversity (the trace of the feature covariance
within each requested class, over the real digits' of that class: 1 is as varied as the data) and the FD to the real
digits of the requested class, averaged over classes (`fd_per_class`; at 100 samples per class in 128 features it is
biased upward, so compare it only between records of the same size).
"""
from __future__ import annotations

import time

import torch

from . import refuse_to_overwrite
from .samplers import Judge, machine

SCALES = {"cfg": (0.0, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 8.0), "cfg_interval": (2.0, 3.0, 5.0, 8.0),
          "cfg_rescale": (3.0, 5.0, 8.0), "classifier": (0.0, 1.0, 2.0, 4.0, 8.0)}
QUICK_SCALES = {"cfg": (0.0, 1.0, 3.0), "cfg_interval": (3.0,), "cfg_rescale": (3.0,), "classifier": (0.0, 2.0)}
INTERVAL = (0.3, 3.0)  # guidance only in the middle of the digits model's range (0.006 .. 157): chosen by hand; lesson 6
# sweeps the interval's ends around it
RESCALE = 0.7  # Lin et al. (2024) use 0.7
RECORD_KEYS = ("dataset", "method", "scale", "interval", "rescale", "nfe", "seed", "samples", "label_accuracy", "fd",
               "fd_at_test_n", "fd_per_class", "precision", "recall", "class_coverage", "diversity", "seconds")


def guided(method: str, scale: float, models: dict, interval=INTERVAL):
    """The guided denoiser of one benchmark configuration (`interval`: cfg_interval's noise levels)."""
    from ..guidance import classifier_free, classifier_guidance

    if method == "classifier":
        pre = models["digits"]
        return classifier_guidance(pre.model, models["noisy_classifier"], scale, schedule=pre.schedule)
    extra = {"cfg": {}, "cfg_interval": {"interval": tuple(interval)}, "cfg_rescale": {"rescale": RESCALE}}
    if method not in extra:
        raise ValueError(f"method must be one of {sorted(SCALES)}, got {method!r}")
    pre = models["digits_cond"]
    return classifier_free(pre.model, scale, schedule=pre.schedule, **extra[method])


def diversity(feats: torch.Tensor, labels: torch.Tensor, real_feats: torch.Tensor, real_labels: torch.Tensor) -> float:
    """Mean over classes of trace(cov(samples of class c)) / trace(cov(real digits of class c))."""
    ratios = []
    for c in labels.unique():
        a, b = feats[labels == c], real_feats[real_labels == c]
        if len(a) > 1 and len(b) > 1:
            ratios.append(float(torch.cov(a.T).trace() / torch.cov(b.T).trace()))
    return sum(ratios) / len(ratios)


def fd_per_class(feats: torch.Tensor, labels: torch.Tensor, real_feats: torch.Tensor, real_labels: torch.Tensor) -> float:
    """Mean over the requested classes c of FD(samples asked to be c, real digits of class c)."""
    from ..metrics import frechet_distance

    fds = [frechet_distance(feats[labels == c], real_feats[real_labels == c]) for c in labels.unique()
           if int((labels == c).sum()) > 1]
    return sum(fds) / len(fds)


def digits_sigmas(nfe: int, sampler: str = "dpmpp_2m") -> torch.Tensor:
    """The noise levels every guided digits sampler uses here: the unconditional digits model's tuned ones for this
    sampler and NFE (digits_cond has the same schedule but no tuned levels of its own; untuned Karras levels over its
    whole range would handicap classifier-free guidance at low NFE)."""
    from ..checkpoints import load_pretrained
    from ..samplers import steps_for_nfe
    from ..step_schedules import default_sigmas

    unc = load_pretrained("digits")
    den_sigmas = unc.schedule.sigmas
    return default_sigmas(steps_for_nfe(sampler, nfe), nfe, sampler, unc.schedule, float(den_sigmas[0]),
                          float(den_sigmas[-1]), unc.model.sampling)[0]


def bench_guidance(quick: bool = False, samples: int | None = None, seeds=None, nfe: int | None = None,
                   progress=print, scales: dict | None = None, interval=INTERVAL) -> list[dict]:
    """Every method at every scale (SCALES, QUICK_SCALES, or `scales`: method -> scales): one flat record per
    (method, scale, seed). `interval` (sigma_lo, sigma_hi): the noise levels cfg_interval guides on."""
    from ..checkpoints import load_pretrained
    from ..data import digits_split
    from ..guidance import load_noisy_classifier
    from ..samplers import sample

    n = samples or (200 if quick else 1000)
    if not isinstance(n, int) or n < 20:
        raise ValueError(f"samples must be an int of at least 20 (two per class, for the per-class diversity), got {n!r}")
    seeds = seeds or ((0,) if quick else (0, 1, 2))
    nfe = nfe or (10 if quick else 20)
    models = {"digits": load_pretrained("digits"), "digits_cond": load_pretrained("digits_cond"),
              "noisy_classifier": load_noisy_classifier()}
    judge = Judge("digits", n)
    real_x, real_y = digits_split("train")
    with torch.no_grad():
        real_feats = judge.clf.features(real_x)
    y = torch.arange(n) % 10
    sigmas = digits_sigmas(nfe)  # one set of noise levels for every method
    records = []
    scales = scales or (QUICK_SCALES if quick else SCALES)
    unknown = set(scales) - set(SCALES)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {sorted(SCALES)}")
    for method, method_scales in scales.items():
        for scale in method_scales:
            for seed in seeds:
                noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
                start = time.perf_counter()
                x = sample(guided(method, scale, models, interval), noise, sigmas=sigmas, sampler="dpmpp_2m",
                           model_kwargs={"y": y}).x.clamp(-1, 1)
                seconds = time.perf_counter() - start
                scores = judge(x)
                with torch.no_grad():
                    feats, pred = judge.clf.features(x), judge.clf(x).argmax(1)
                rec = {"dataset": "digits", "method": method, "scale": scale,
                       "interval": [float(v) for v in interval] if method == "cfg_interval" else None,
                       "rescale": RESCALE if method == "cfg_rescale" else 0.0, "nfe": nfe, "seed": seed, "samples": n,
                       "label_accuracy": round((pred == y).float().mean().item(), 4),
                       "diversity": round(diversity(feats, y, real_feats, real_y), 4),
                       "fd_per_class": round(fd_per_class(feats, y, real_feats, real_y), 4), "seconds": round(seconds, 2),
                       **scores}
                records.append({k: rec.get(k) for k in RECORD_KEYS})
                progress(f"{method:>12} scale {scale:>4}: label acc {rec['label_accuracy']:.3f}, FD {rec['fd']:.1f}, "
                         f"precision {rec['precision']:.3f}, recall {rec['recall']:.3f}, diversity "
                         f"{rec['diversity']:.2f} ({seconds:.1f} s)")
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Mean over seeds per (method, scale), in the order run."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["scale"]), []).append(r)
    out = []
    for (method, scale), rs in groups.items():
        mean = {k: round(sum(r[k] for r in rs) / len(rs), 4)
                for k in ("label_accuracy", "fd", "fd_per_class", "precision", "recall", "diversity") if k in rs[0]}
        out.append({"method": method, "scale": scale, "seeds": len(rs), **mean})
    return out


def main_guidance(quick: bool, json_path=None, samples=None, force: bool = False, seeds=None) -> int:
    """The `bench guidance` command: run, print a summary per method and scale, optionally write JSON records."""
    from pathlib import Path

    from ..checkpoints import write_json_atomic

    refuse_to_overwrite(json_path, force)
    start = time.perf_counter()
    records = bench_guidance(quick=quick, samples=samples, seeds=seeds)
    print(f"{'method':>12} {'scale':>6} {'label acc':>9} {'FD':>7} {'precision':>9} {'recall':>7} {'diversity':>9}")
    for s in summarize(records):
        print(f"{s['method']:>12} {s['scale']:>6g} {s['label_accuracy']:>9.3f} {s['fd']:>7.1f} {s['precision']:>9.3f} "
              f"{s['recall']:>7.3f} {s['diversity']:>9.2f}")
    print(f"{len(records)} configurations in {time.perf_counter() - start:.0f} s on {machine()}")
    if json_path is not None:
        write_json_atomic(records, Path(json_path))
        print(f"Wrote {json_path}")
    return 0
