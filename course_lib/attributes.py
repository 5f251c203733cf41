"""Reading a shapes image back into its attributes: the shipped attribute classifier, prompt adherence of generated
images (per attribute, and binding for two objects) and the Frechet distance on its features."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import checkpoints as ckpt_io
from .metrics import frechet_distance
from .nets import AttributeClassifier
from .shapes import (
    COLOURS,
    LABELS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    canonical,
    make_shapes,
    parse_caption,
    scene_labels,
)

HEADS = {"count": 2, "shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES), "position": len(POSITIONS),
         "shape2": len(SHAPES), "colour2": len(COLOURS), "relation": len(RELATIONS)}


@functools.lru_cache(maxsize=8)
def dataset(n: int, split: str = "train", seed: int = 0):
    """make_shapes(n, split, seed) with its labels, computed once per process: (images, captions, labels)."""
    images, captions, scenes = make_shapes(n, split, seed)
    return images, tuple(captions), scene_labels(scenes)


def train_attribute_classifier(steps: int = 1500, n_train: int = 20_000, batch_size: int = 128, lr: float = 2e-3,
                               seed: int = 0, progress: bool = True) -> tuple[AttributeClassifier, dict]:
    """Cross-entropy summed over the heads (an attribute that does not apply, -1, is ignored), on the train split and
    a fifth as many held-out-pair images (seed 7; the judge must read every colour-shape pair, while the generators
    never see those pairs), with light Gaussian noise (generated images are never exactly clean); returns the model
    (eval mode) and its card, with accuracy on the test split and on held-out images of seed 0 (not trained on)."""
    from .fit import fit

    torch.manual_seed(seed)
    clf = AttributeClassifier(HEADS)
    images, _, labels = dataset(n_train, "train", seed)
    extra_images, _, extra_labels = dataset(n_train // 5, "heldout", 7)
    images = torch.cat([images, extra_images])
    labels = {k: torch.cat([labels[k], extra_labels[k]]) for k in labels}
    g = torch.Generator().manual_seed(seed)

    def loss_fn(step):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = images[idx] + 0.08 * torch.rand(batch_size, 1, 1, 1, generator=g) * torch.randn(
            batch_size, 3, 32, 32, generator=g)
        logits = clf(x)
        return sum(F.cross_entropy(logits[k], labels[k][idx], ignore_index=-1) for k in HEADS)

    clf, log = fit(clf, loss_fn, steps, lr=lr, desc="attribute classifier", progress=progress)
    card = {"steps": steps, "seed": seed, "train_images": n_train, "heldout_pair_images": n_train // 5,
            "train_seconds": round(log["seconds"], 1),
            "test_accuracy": accuracy(clf, *dataset(2000, "test", 0)[::2]),
            "heldout_accuracy": accuracy(clf, *dataset(1000, "heldout", 0)[::2]), "test_images": 2000,
            "heldout_images": 1000}
    return clf, card


@torch.no_grad()
def predict(clf: AttributeClassifier, images: torch.Tensor, batch: int = 500) -> dict[str, torch.Tensor]:
    """The predicted class per attribute, {attribute: (n,) long}."""
    outs = [clf(images[i:i + batch].float().cpu()) for i in range(0, len(images), batch)]
    return {k: torch.cat([o[k] for o in outs]).argmax(1) for k in HEADS}


def accuracy(clf: AttributeClassifier, images: torch.Tensor, labels: dict) -> dict[str, float]:
    """Share correct per attribute, over the images where it applies."""
    pred = predict(clf, images)
    return {k: round((pred[k][labels[k] >= 0] == labels[k][labels[k] >= 0]).float().mean().item(), 4)
            for k in LABELS if (labels[k] >= 0).any()}


def prompt_labels(prompts) -> dict[str, torch.Tensor]:
    """What each prompt asks for, as attribute targets (-1 where the prompt leaves it open or it does not apply); a
    two-object prompt in canonical order ('a blue square right of a red circle' asks for what 'a red circle left of a
    blue square' asks for)."""
    out = {k: torch.full((len(prompts),), -1, dtype=torch.long) for k in LABELS}
    for i, p in enumerate(prompts):
        s = canonical(parse_caption(p))
        a = s["objects"][0]
        out["count"][i] = len(s["objects"]) - 1
        out["shape"][i], out["colour"][i] = SHAPES.index(a["shape"]), tuple(COLOURS).index(a["colour"])
        if "size" in a:
            out["size"][i] = tuple(SIZES).index(a["size"])
        if "position" in a:
            out["position"][i] = tuple(POSITIONS).index(a["position"])
        if s["relation"] is not None:
            b = s["objects"][1]
            out["shape2"][i], out["colour2"][i] = SHAPES.index(b["shape"]), tuple(COLOURS).index(b["colour"])
            out["relation"][i] = RELATIONS.index(s["relation"])
    return out


def _judge(clf: AttributeClassifier, images: torch.Tensor, prompts) -> tuple[dict, dict, dict]:
    """(wanted labels, predicted labels, per-attribute right-or-not-named), each {attribute: (n,) tensor}."""
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    want, pred = prompt_labels(prompts), predict(clf, images)
    return want, pred, {k: (pred[k] == want[k]) | (want[k] < 0) for k in LABELS}


def adherence_per_image(clf: AttributeClassifier, images: torch.Tensor, prompts) -> torch.Tensor:
    """(n,) bool: the judge reads every attribute the image's prompt names as asked."""
    _, _, right = _judge(clf, images, prompts)
    return torch.stack(list(right.values())).all(0)


def adherence(clf: AttributeClassifier, images: torch.Tensor, prompts) -> dict[str, float]:
    """How well images follow their prompts, as the classifier reads them: accuracy per attribute the prompts name,
    'all' (every named attribute right in the same image) and, for two-object prompts, 'binding' (both objects with
    the right colour on the right shape, in the right places: the left or upper one first). 'relation' is the
    arrangement only (side by side or stacked): in canonical form 'right of' is 'left of' with the objects exchanged,
    so an image with the two objects in each other's places scores a right relation and a wrong binding."""
    want, pred, right = _judge(clf, images, prompts)
    out = {}
    for k in LABELS:
        named = want[k] >= 0
        if named.any():
            out[k] = round((pred[k] == want[k])[named].float().mean().item(), 4)
    ok = torch.stack(list(right.values())).all(0)
    out["all"] = round(ok.float().mean().item(), 4)
    two = want["count"] == 1
    if two.any():
        out["binding"] = round(ok[two].float().mean().item(), 4)
    return out


BINDING_OUTCOMES = ("bound", "swapped", "misbound", "missing")


def binding_breakdown(clf: AttributeClassifier, images: torch.Tensor, prompts) -> dict[str, float]:
    """What happens to the two objects of two-object prompts, as shares of those prompts: 'bound' (each object has its
    colour and shape, in its place, arranged as asked: adherence's 'binding'), 'swapped' (the two objects are right but
    in each other's places), 'misbound' (both shapes and both colours are there, on the wrong shapes), 'missing' (a
    shape or colour asked for is not there, or another fault: wrong count or arrangement with the right objects);
    they add up to 1. 'present' is the share whose image holds both shapes and both colours asked for, wherever they
    are (bound + swapped + misbound, and any of those with a wrong arrangement). When the two objects share a shape or
    a colour, a swap and a misbinding are the same image; it counts as swapped."""
    want, pred, right = _judge(clf, images, prompts)
    two = want["count"] == 1
    if not two.any():
        raise ValueError("binding_breakdown needs two-object prompts ('a red circle left of a blue square')")
    w = {k: v[two] for k, v in want.items()}
    p = {k: v[two] for k, v in pred.items()}
    first = lambda d: (d["shape"], d["colour"])  # noqa: E731
    second = lambda d: (d["shape2"], d["colour2"])  # noqa: E731
    same = lambda a, b: (a[0] == b[0]) & (a[1] == b[1])  # noqa: E731
    shapes_there = ((p["shape"] == w["shape"]) & (p["shape2"] == w["shape2"])) | (
        (p["shape"] == w["shape2"]) & (p["shape2"] == w["shape"]))
    colours_there = ((p["colour"] == w["colour"]) & (p["colour2"] == w["colour2"])) | (
        (p["colour"] == w["colour2"]) & (p["colour2"] == w["colour"]))
    present = shapes_there & colours_there & (p["count"] == 1)
    arranged = (p["count"] == 1) & (p["relation"] == w["relation"])
    bound = torch.stack([v[two] for v in right.values()]).all(0)
    swapped = ~bound & arranged & same(first(p), second(w)) & same(second(p), first(w))
    misbound = ~bound & ~swapped & arranged & present
    missing = ~(bound | swapped | misbound)
    n = float(two.sum())
    out = {k: round(float(v.sum()) / n, 4) for k, v in zip(BINDING_OUTCOMES, (bound, swapped, misbound, missing))}
    out["present"] = round(float(present.sum()) / n, 4)
    return out


@torch.no_grad()
def fd(clf: AttributeClassifier, images: torch.Tensor, reference: torch.Tensor, batch: int = 500) -> float:
    """Frechet distance between the classifier's features of two image sets (an FID for shapes)."""
    feats = [torch.cat([clf.features(s[i:i + batch].float().cpu()) for i in range(0, len(s), batch)]).double()
             for s in (images, reference)]
    return frechet_distance(*feats)


def export(clf, path, card: dict, config: dict):
    """Write any lesson-7 network in the course checkpoint format (weights, model config, card), atomically."""
    state = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": "weights", "config": config,
             "model_config": clf.config, "weights": {k: v.detach().cpu() for k, v in clf.state_dict().items()},
             "card": card}
    return ckpt_io.save_atomic(state, path)


def load_attribute_classifier(path=None) -> AttributeClassifier:
    """The shipped attribute classifier (data/shapes_classifier.pt), in eval mode."""
    return ckpt_io.load_model(path or ckpt_io.shipped_dir() / "shapes_classifier.pt").model
