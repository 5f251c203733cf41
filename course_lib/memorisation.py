"""Finding training images in a model's samples (Carlini et al. 2023, sec. 4; Somepalli et al. 2023): each sample's
nearest training image, in pixels or in a classifier's features, is flagged as a copy when it is nearer than all but a
small share of held-out real images are (a threshold calibrated on images the model never saw), and copy rates are
counted by how many times the training set held the image (lesson 14)."""
from __future__ import annotations

import math

import torch

from .metrics import nearest_neighbours

FALSE_POSITIVE = 0.01  # the share of held-out real images the copy threshold flags
SAMPLE_STEPS = 20  # lesson 14 samples each model with the sampler its card recommends at this budget
SHOW = 8  # measure() keeps this many of the samples nearest the training set (their pixels), for the lesson


def _embed(images: torch.Tensor, features) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if features is None:
        return images.reshape(len(images), -1)
    with torch.no_grad():
        return features(images).reshape(len(images), -1)


def calibrate_threshold(train: torch.Tensor, held_out: torch.Tensor, false_positive: float = FALSE_POSITIVE,
                        features=None) -> float:
    """The distance to the nearest training image below which only `false_positive` of the held-out real images fall:
    a sample nearer than that is closer to a training image than 99% (by default) of new real images are."""
    if not isinstance(false_positive, float) or not 0 < false_positive < 1:
        raise ValueError(f"false_positive must be a float in (0, 1), got {false_positive!r}")
    if len(held_out) < 1 / false_positive:
        raise ValueError(f"a {false_positive:.0%} quantile needs at least {round(1 / false_positive)} held-out images, "
                         f"got {len(held_out)}")
    dist, _ = nearest_neighbours(_embed(held_out, features), _embed(train, features))
    return float(dist.quantile(false_positive))


def flag_rate_interval(n_held: int, false_positive: float = FALSE_POSITIVE, level: float = 0.9) -> tuple[float, float]:
    """The share of NEW real images that a threshold calibrated on `n_held` held-out images flags is itself random: the
    quantile is an order statistic, and the share below the r-th smallest of n draws is Beta(r, n + 1 - r)
    (David & Nagaraja 2003, sec. 2.1). Returns the central `level` interval of that share, widened to both order
    statistics that torch.quantile interpolates between: a sample's flag rate inside it is what new images give."""
    from scipy.stats import beta

    if not isinstance(n_held, int) or n_held < 2:
        raise ValueError(f"n_held must be an int >= 2, got {n_held!r}")
    if not 0 < false_positive < 1 or not 0 < level < 1:
        raise ValueError(f"false_positive and level must be in (0, 1), got {false_positive!r} and {level!r}")
    h = (n_held - 1) * false_positive  # torch.quantile's 0-based position
    r_lo, r_hi = math.floor(h) + 1, min(math.ceil(h) + 1, n_held)
    return (float(beta.ppf((1 - level) / 2, r_lo, n_held + 1 - r_lo)),
            float(beta.ppf((1 + level) / 2, r_hi, n_held + 1 - r_hi)))


def find_copies(samples: torch.Tensor, train: torch.Tensor, threshold: float, features=None) -> dict:
    """For every sample: its nearest training image (`nearest`, an index into `train`), the distance to it and whether
    that distance is below `threshold` (`copy`); in pixels, or in `features(images)` when given."""
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    dist, idx = nearest_neighbours(_embed(samples, features), _embed(train, features))
    return {"copy": dist < threshold, "nearest": idx, "distance": dist}


def copy_rates(found: dict, distinct_factor: torch.Tensor) -> dict:
    """Per duplication factor f (a string key: how many times the training set held an image): `images`, how many distinct images
    had it; `images_copied`, the share of them that at least one sample copies; `per_image`, copies per image per
    1,000 samples; and `samples`, the share of all samples that copy one of them. `found` is find_copies' answer
    against the distinct training images, `distinct_factor` their factors."""
    copy, nearest = found["copy"], found["nearest"]
    n = len(copy)
    out = {}
    for f in sorted(set(distinct_factor.tolist())):
        group = distinct_factor == f
        hits = copy & group[nearest]
        copied = torch.zeros(len(group), dtype=torch.bool)
        copied[nearest[hits]] = True
        k = int(group.sum())
        out[str(int(f))] = {"images": k, "images_copied": float(copied[group].double().mean()),
                       "per_image": 1000 * float(hits.sum()) / (k * n), "samples": float(hits.double().mean())}
    out["all"] = {"images": len(distinct_factor), "samples": float(copy.double().mean())}
    return out


def measure(model, schedule, n: int, seed: int, distinct: torch.Tensor, distinct_factor: torch.Tensor,
            held_out: torch.Tensor, features=None) -> dict:
    """Sample `n` images from a digits model (noise seed `seed`, SAMPLE_STEPS calls of its recommended sampler) and
    count its copies of the `distinct` training images, in pixels and (with `features`) in features; `closest` keeps
    the SHOW samples nearest a training image (pixels, rounded) with that image's index, distance and factor."""
    from .samplers import sample

    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = sample(model, noise, schedule, steps=SAMPLE_STEPS, clip=1.0,
                   generator=torch.Generator().manual_seed(seed + 1)).x.clamp(-1, 1)
    out = {}
    for space, feats in (("pixels", None), ("features", features)):
        if space == "features" and feats is None:
            continue
        threshold = calibrate_threshold(distinct, held_out, features=feats)
        found = find_copies(x, distinct, threshold, features=feats)
        out[space] = {"threshold": round(threshold, 4), **copy_rates(found, distinct_factor)}
        if space == "pixels":  # the closest samples and their training images, for the lesson to show
            order = found["distance"].argsort()[:SHOW]
            out["closest"] = {"samples": _rounded(x[order]), "nearest": found["nearest"][order].tolist(),
                              "distance": [round(float(d), 4) for d in found["distance"][order]],
                              "factor": distinct_factor[found["nearest"][order]].tolist()}
    return out


def _rounded(images: torch.Tensor) -> list:
    return [[round(float(v), 3) for v in img.flatten()] for img in images]
