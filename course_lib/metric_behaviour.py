"""How sample-quality metrics behave (lesson 14), measured on real digits where the truth is known: Frechet distance
and KID between two sets of real digits as the sample size grows (FD's bias; KID's expectation is 0), in three
feature spaces; both under controlled degradations (blur, noise, dropped classes); and precision / recall /
density / coverage of a set that drops modes against one that blurs."""
from __future__ import annotations

import torch

from . import metrics

NS = (25, 50, 100, 200, 400, 800)  # the sample sizes of the bias curves (two disjoint sets of n among 1,797 digits)
RESAMPLES = 3  # disjoint draws per point: the error bars
FEATURES = ("classifier", "random_net", "pixels")
DEGRADATIONS = {"blur": (0.0, 0.5, 1.0, 1.5), "noise": (0.0, 0.1, 0.2, 0.4), "drop": (0, 1, 3, 5)}
REFERENCE, CANDIDATES = 800, 400  # degradations: a reference set of real digits and a candidate set, disjoint


def feature_maps() -> dict:
    """name -> images (n, 1, 8, 8) -> features: the shipped digits classifier's 128-d penultimate layer (what the
    course's FD uses), the same network with random weights (seed 0: features no training shaped), raw pixels."""
    from .classifier import DigitsClassifier, load_classifier

    clf = load_classifier()
    torch.manual_seed(0)
    rand = DigitsClassifier(**{k: v for k, v in clf.config.items() if k != "kind"}).eval()

    def run(net):
        def fn(x):
            with torch.no_grad():
                return net.features(x.float())
        return fn
    return {"classifier": run(clf), "random_net": run(rand), "pixels": lambda x: x.reshape(len(x), -1).double()}


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of standard deviation `sigma` pixels (kernel of 2 ceil(3 sigma) + 1 taps, edges replicated)."""
    if sigma == 0:
        return images.clone()
    r = max(1, int(torch.tensor(3 * sigma).ceil()))
    taps = torch.exp(-torch.arange(-r, r + 1, dtype=images.dtype) ** 2 / (2 * sigma**2))
    taps = taps / taps.sum()
    x = torch.nn.functional.pad(images, (r, r, r, r), mode="replicate")
    x = torch.nn.functional.conv2d(x, taps.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(x, taps.view(1, 1, -1, 1))


def degrade(images: torch.Tensor, labels: torch.Tensor, kind: str, level, n: int, seed: int) -> torch.Tensor:
    """n candidate digits degraded by `kind` at `level`: blurred (sigma), noised (std, clamped to [-1, 1]), or drawn
    without the first `level` classes of a seeded order of the ten (the others keep their shares)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "drop":
        dropped = torch.randperm(10, generator=g)[:level]
        keep = ~torch.isin(labels, dropped)
        images = images[keep]
    if len(images) < n:
        raise ValueError(f"{kind} at {level}: only {len(images)} candidates for n = {n}")
    x = images[torch.randperm(len(images), generator=g)[:n]]
    if kind == "blur":
        return blur(x, float(level))
    if kind == "noise":
        return (x + float(level) * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    if kind != "drop":
        raise ValueError(f"kind must be one of {tuple(DEGRADATIONS)}, got {kind!r}")
    return x


def bias_curves(ns=NS, resamples: int = RESAMPLES, features=None, first: int = 0) -> list[dict]:
    """FD and KID between two disjoint random sets of n real digits (all 1,797), for each n, resampling (numbered from
    `first`: each number is its own draw) and feature space: what a perfect model would score at that n."""
    from .data import load_digits

    images, _ = load_digits()
    features = features or feature_maps()
    out = []
    for r in range(first, first + resamples):
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(100 + r))
        for n in ns:
            if 2 * n > len(images):
                raise ValueError(f"n = {n}: two disjoint sets need {2 * n} digits, there are {len(images)}")
            a, b = images[perm[:n]], images[perm[n:2 * n]]
            for name, f in features.items():
                fa, fb = f(a), f(b)
                out.append({"kind": "bias", "features": name, "n": n, "resample": r,
                            "fd": metrics.frechet_distance(fa, fb), "kid": metrics.kid(fa, fb)})
    return out


def sensitivity(resamples: int = RESAMPLES, features=None, first: int = 0) -> list[dict]:
    """FD, KID, precision, recall, density and coverage of CANDIDATES degraded digits against REFERENCE real digits
    (disjoint, from all 1,797), for each degradation, level, resampling (numbered from `first`) and feature space."""
    from .data import load_digits

    images, labels = load_digits()
    features = features or feature_maps()
    out = []
    for r in range(first, first + resamples):
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(200 + r))
        ref, pool, pool_labels = images[perm[:REFERENCE]], images[perm[REFERENCE:]], labels[perm[REFERENCE:]]
        for kind, levels in DEGRADATIONS.items():
            for level in levels:
                x = degrade(pool, pool_labels, kind, level, CANDIDATES, seed=300 + r)
                for name, f in features.items():
                    fr, fx = f(ref), f(x)
                    out.append({"kind": "sensitivity", "degradation": kind, "level": level, "features": name,
                                "resample": r, "fd": metrics.frechet_distance(fx, fr), "kid": metrics.kid(fx, fr),
                                **metrics.precision_recall(fr, fx, k=5), **metrics.density_coverage(fr, fx, k=5)})
    return out
