"""`shapes`: captioned 32x32 RGB images generated procedurally, deterministically and offline (lessons 7, 8 and 10).

One or two objects (a shape, a colour, a size, a place) on a black background, each image with a caption from a
small grammar that parses back to its attributes:

    "a small red circle at the top left"              one object: size, colour, shape, position
    "a blue square left of a green triangle"           two objects and their relation (left of, right of, above, below)

Some (colour, shape) pairs never occur in the train and test splits, only in the `heldout` split, to measure
compositional generalisation (a model that has seen red things and triangles, but never a red triangle).
"""
from __future__ import annotations

import hashlib
import math

import torch

from .grammar import (  # noqa: F401  (the grammar's names are part of this module's interface)
    COLOURS,
    HELD_OUT,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    VOCAB,
    complete_prompt,
    parse_caption,
    prompt_words,
)

SIZE = 32
_SUPER = 4  # render at 4x and average: anti-aliased edges
def _split_seed(split: str, seed: int) -> int:
    """One generator seed per (split, seed), stable across machines and Python versions."""
    return int.from_bytes(hashlib.sha256(f"shapes/{split}/{seed}".encode()).digest()[:7], "big")


def _choice(options, gen) -> int:
    return int(torch.randint(len(options), (1,), generator=gen))


def _object(gen, split: str, size: str | None = None) -> dict:
    """A random (colour, shape, size) for `split`: train / test avoid HELD_OUT pairs, heldout uses only them."""
    if split == "heldout":
        colour, shape = HELD_OUT[_choice(HELD_OUT, gen)]
    else:
        allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]
        colour, shape = allowed[_choice(allowed, gen)]
    return {"shape": shape, "colour": colour, "size": size or tuple(SIZES)[_choice(SIZES, gen)]}


def _centre(cell: tuple[int, int], gen) -> tuple[float, float]:
    """The (row, column) centre in pixels of a 3x3 grid cell (6, 16 or 26), jittered by up to 1 pixel: a large shape
    at an edge loses at most a pixel."""
    r, c = (6 + 10 * v + (float(torch.rand(1, generator=gen)) - 0.5) * 2 for v in cell)
    return r, c


def _scene(gen, split: str) -> dict:
    """One scene: one object at a named position, or two objects in a relation (half the scenes each)."""
    if _choice((1, 2), gen) == 0:
        obj = _object(gen, split)
        pos = tuple(POSITIONS)[_choice(POSITIONS, gen)]
        obj["position"], obj["centre"] = pos, _centre(POSITIONS[pos], gen)
        return {"objects": [obj], "relation": None}
    a, b = _object(gen, split, "small"), _object(gen, split, "small")
    relation = RELATIONS[_choice(RELATIONS, gen)]
    k = _choice((0, 1, 2), gen)  # the row (left / right) or column (above / below) the pair shares
    if relation in ("left of", "right of"):
        first, second = (k, 0), (k, 2)
    else:
        first, second = (0, k), (2, k)
    if relation in ("right of", "below"):
        first, second = second, first
    a["centre"], b["centre"] = _centre(first, gen), _centre(second, gen)
    return {"objects": [a, b], "relation": relation}


def caption(scene: dict) -> str:
    """The caption of a scene: 'a small red circle at the top left' or 'a red circle left of a blue square'."""
    objs = scene["objects"]
    if scene["relation"] is None:
        o = objs[0]
        return f"a {o['size']} {o['colour']} {o['shape']} at the {o['position']}"
    a, b = objs
    return f"a {a['colour']} {a['shape']} {scene['relation']} a {b['colour']} {b['shape']}"


def _mask(shape: str, radius: float, centre: tuple[float, float], rows: torch.Tensor, cols: torch.Tensor):
    """Coverage (0/1) of one shape on the supersampled grid of pixel coordinates."""
    dy, dx = rows - centre[0], cols - centre[1]
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        half = radius / math.sqrt(2) * 1.2
        return (dx.abs() <= half) & (dy.abs() <= half)
    if shape == "triangle":  # apex up, base at +radius/2
        top, base = -radius, radius * 0.6
        half_width = (dy - top) / (base - top) * radius
        return (dy >= top) & (dy <= base) & (dx.abs() <= half_width)
    if shape == "cross":
        arm = radius * 0.35
        return ((dx.abs() <= arm) & (dy.abs() <= radius)) | ((dy.abs() <= arm) & (dx.abs() <= radius))
    if shape == "star":  # lesson 13's new concept, never in a split: five points up, inner radius 0.45 of the outer
        return _star(dx, dy, radius * 1.15, radius * 1.15 * 0.45)
    raise ValueError(f"unknown shape {shape!r}; shapes: {SHAPES + NEW_SHAPES}")


NEW_SHAPES = ("star",)  # drawable, but in no split and not in the vocabulary: lesson 13 teaches it to a trained model


def _star(dx: torch.Tensor, dy: torch.Tensor, outer: float, inner: float) -> torch.Tensor:
    """Inside a five-pointed star (one point straight up): a point is inside when it is nearer the centre than the
    star's edge along the ray through it (the star is star-shaped about its centre, so this test is exact)."""
    angle = torch.atan2(dx, -dy) % (2 * math.pi)  # 0 straight up, clockwise
    sector = 2 * math.pi / 10
    k = torch.floor(angle / sector)
    a0, a1 = k * sector, (k + 1) * sector
    r0 = torch.where(k % 2 == 0, torch.tensor(outer), torch.tensor(inner))
    r1 = torch.where(k % 2 == 0, torch.tensor(inner), torch.tensor(outer))
    # the edge from (r0, a0) to (r1, a1) in the frame of the ray: the radius where the ray meets it
    p0x, p0y, p1x, p1y = r0 * torch.sin(a0), r0 * torch.cos(a0), r1 * torch.sin(a1), r1 * torch.cos(a1)
    ux, uy = torch.sin(angle), torch.cos(angle)
    ex, ey = p1x - p0x, p1y - p0y
    edge = (p0x * ey - p0y * ex) / (ux * ey - uy * ex)
    return dx ** 2 + dy ** 2 <= edge ** 2


def render(scene: dict) -> torch.Tensor:
    """The (3, 32, 32) float32 image of a scene in [-1, 1] (black background), anti-aliased."""
    n = SIZE * _SUPER
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / _SUPER
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    img = torch.zeros(3, n, n)
    for o in scene["objects"]:
        m = _mask(o["shape"], SIZES[o["size"]], o["centre"], rows, cols)
        img[:, m] = torch.tensor(COLOURS[o["colour"]])[:, None]
    img = torch.nn.functional.avg_pool2d(img[None], _SUPER)[0]
    return img * 2 - 1


def make_shapes(n: int, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, list[str], list[dict]]:
    """n captioned images of a split: (images (n, 3, 32, 32) in [-1, 1], captions, scenes); the same (n, split, seed)
    gives the same bytes on any machine. Test and heldout use their own generators, so no image repeats across them."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    gen = torch.Generator().manual_seed(_split_seed(split, seed))
    scenes = [_scene(gen, split) for _ in range(n)]
    return torch.stack([render(s) for s in scenes]), [caption(s) for s in scenes], scenes


MAX_WORDS = 10  # the longest caption has 8 words


def tokenize(captions, max_len: int = MAX_WORDS) -> torch.Tensor:
    """Captions as (n, max_len) int64 indices into VOCAB, padded with 0 ('<pad>') after the last word; every caption
    is checked by parse_caption first, so a prompt the grammar does not know is refused with the vocabulary."""
    if isinstance(captions, str):
        captions = [captions]
    out = torch.zeros(len(captions), max_len, dtype=torch.long)
    index = {w: i for i, w in enumerate(VOCAB)}
    for row, text in enumerate(captions):
        parse_caption(text)
        words = prompt_words(text)
        if len(words) > max_len:
            raise ValueError(f"{text!r} has {len(words)} words; max_len is {max_len}")
        out[row, :len(words)] = torch.tensor([index[w] for w in words])
    return out


def detokenize(tokens: torch.Tensor) -> list[str]:
    """The captions back from tokenize's indices (padding dropped)."""
    return [" ".join(VOCAB[int(i)] for i in row if int(i) != 0) for row in tokens]


LABELS = ("count", "shape", "colour", "size", "position", "shape2", "colour2", "relation")


def canonical(scene: dict) -> dict:
    """The same scene named one way only: 'a blue square right of a red circle' is 'a red circle left of a blue square',
    'below' becomes 'above'. An image cannot tell which of two equivalent captions it was drawn from, so labels (and
    prompt adherence) use this form: first the left (or upper) object, then the other, relation 'left of' or 'above'."""
    if scene.get("relation") not in ("right of", "below"):
        return scene
    a, b = scene["objects"]
    return {**scene, "objects": [b, a], "relation": {"right of": "left of", "below": "above"}[scene["relation"]]}


def canonical_caption(text: str) -> str:
    """A caption in canonical form (see `canonical`): equivalent captions of one scene give the same string."""
    s = canonical(parse_caption(text))
    if s["relation"] is None:
        return " ".join(text.lower().replace(",", " ").split())
    a, b = s["objects"]
    return f"a {a['colour']} {a['shape']} {s['relation']} a {b['colour']} {b['shape']}"


def scene_labels(scenes: list[dict]) -> dict[str, torch.Tensor]:
    """Integer targets per scene for an attribute classifier: count (0: one object, 1: two), the first object's
    shape, colour; for one object its size and position, for two (in canonical order: the left or upper object first)
    the second's shape and colour and the relation (index into RELATIONS: 0 'left of' or 2 'above'); -1 where an
    attribute does not apply."""
    out = {k: torch.full((len(scenes),), -1, dtype=torch.long) for k in LABELS}
    for i, s in enumerate(scenes):
        s = canonical(s)
        a = s["objects"][0]
        out["count"][i] = len(s["objects"]) - 1
        out["shape"][i], out["colour"][i] = SHAPES.index(a["shape"]), tuple(COLOURS).index(a["colour"])
        if s["relation"] is None:
            out["size"][i], out["position"][i] = tuple(SIZES).index(a["size"]), tuple(POSITIONS).index(a["position"])
        else:
            b = s["objects"][1]
            out["shape2"][i], out["colour2"][i] = SHAPES.index(b["shape"]), tuple(COLOURS).index(b["colour"])
            out["relation"][i] = RELATIONS.index(s["relation"])
    return out
