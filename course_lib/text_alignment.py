"""Judging text-image alignment two ways (lesson 14): CLIPScore with the shipped mini-CLIP (Hessel et al. 2021) and
the attribute judge of lesson 7, across guidance scales; how often CLIPScore ranks an image the judge reads as right
above one it reads as wrong (an AUC), and whether it can tell a two-object image's caption from the same caption with
the colours swapped (binding, which the judge checks object by object)."""
from __future__ import annotations

import re

import torch

SCALES = (1.0, 1.5, 2.0, 3.0, 5.0, 8.0)


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The probability that a random positive scores above a random negative (ties count one half): the area under
    the ROC curve, by the Mann-Whitney U statistic. NaN when either class is empty."""
    pos, neg = scores[positive.bool()].double(), scores[~positive.bool()].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def swap_colours(caption: str) -> str:
    """A two-object caption with its two colours exchanged ('a red circle left of a blue square' ->
    'a blue circle left of a red square'); the same words, bound the other way."""
    from .grammar import COLOURS

    found = [w for w in caption.split() if w in COLOURS]
    if len(found) != 2 or found[0] == found[1]:
        raise ValueError(f"need a caption with two different colours, got {caption!r}")
    a, b = found
    return re.sub(rf"\b({a}|{b})\b", lambda m: b if m.group(0) == a else a, caption)


def alignment_at(model, scale: float, n: int = 200, nfe: int = 20, seed: int = 0, clip=None, clf=None) -> dict:
    """At one guidance scale: n one-object and n two-object test prompts (two different colours); the mean CLIPScore,
    the judge's adherence ('all') and binding, the AUC of CLIPScore for the judge's right-or-wrong, and the share of
    two-object images whose CLIPScore is higher for their caption than for it with the colours swapped; and each
    one-object image's CLIPScore and right-or-wrong (for an AUC pooled over scales: at some, no image is wrong)."""
    from .attributes import adherence, adherence_per_image, load_attribute_classifier
    from .clip import clip_score, load_clip
    from .text2image import single_object_prompts, two_object_prompts

    clip, clf = clip or load_clip(), clf or load_attribute_classifier()
    one = single_object_prompts(n)
    two = [p for p in two_object_prompts(3 * n, seed=seed + 5) if len({w for w in p.split()} & _colours()) == 2][:n]
    img1 = model.generate(one, scale=scale, nfe=nfe, seed=seed)
    img2 = model.generate(two, scale=scale, nfe=nfe, seed=seed + 1)
    s1, s2 = clip_score(clip, img1, one), clip_score(clip, img2, two)
    right1 = adherence_per_image(clf, img1, one)
    swapped = clip_score(clip, img2, [swap_colours(p) for p in two])
    return {"scale": scale, "samples": n, "clip_score": float(s1.mean()), "clip_score_two": float(s2.mean()),
            "all": adherence(clf, img1, one)["all"], "binding": adherence(clf, img2, two)["binding"],
            "auc": auc(s1, right1), "prefers_true_binding": float((s2 > swapped).double().mean()),
            "scores": [round(float(v), 3) for v in s1], "right": [bool(v) for v in right1]}  # pooled AUC over scales


def _colours() -> set:
    from .grammar import COLOURS

    return set(COLOURS)
