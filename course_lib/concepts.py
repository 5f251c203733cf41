"""Lesson 13's new concept: a shape the shapes model never saw (a five-pointed star), its captioned images, a new
word for it in the text encoder's vocabulary (the placeholder token of textual inversion, Gal et al. 2023; the
identifier of DreamBooth, Ruiz et al. 2023), and a judge that reads it.

The word is appended to the vocabulary (index len(VOCAB)), so every old caption tokenizes exactly as before; it may
stand wherever a shape does: 'a small red star at the top left', 'a star'-less prompt is lesson 7's prompt.
The judge is the shipped attribute classifier's frozen trunk with a new shape head that reads five shapes, trained on
rendered images only (seeds no adapted model sees), so it judges generated stars without having learnt from them.
"""
from __future__ import annotations

import functools
import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from .shapes import COLOURS, MAX_WORDS, NEW_SHAPES, POSITIONS, SHAPES, SIZES, VOCAB, prompt_words, render
from .shapes import tokenize as _tokenize

WORD = NEW_SHAPES[0]  # "star"
WORD_INDEX = len(VOCAB)  # its token id: the first row after lesson 7's vocabulary
ALL_SHAPES = SHAPES + (WORD,)
_STAND_IN = SHAPES[0]  # the grammar is checked with a known shape in the new word's place
PURPOSES = ("adapt", "judge", "test")  # separate generators: the images a model adapts on, the judge's, test prompts


def tokenize(captions, max_len: int = MAX_WORDS) -> torch.Tensor:
    """Captions as (n, max_len) token ids: shapes.tokenize's, with the new word at WORD_INDEX ('' is the empty
    caption, all padding). A caption the grammar does not know is refused with the vocabulary, as there."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    rows = []
    for text in captions:
        if not isinstance(text, str):
            raise TypeError(f"a caption is a str, got {type(text).__name__}")
        words = prompt_words(text)
        if not words:
            rows.append(torch.zeros(max_len, dtype=torch.long))
            continue
        row = _tokenize(" ".join(_STAND_IN if w == WORD else w for w in words), max_len)[0]
        row[[j for j, w in enumerate(words) if w == WORD]] = WORD_INDEX
        rows.append(row)
    if not rows:
        raise ValueError("give at least one caption")
    return torch.stack(rows)


def add_word(encoder, seed: int = 0):
    """A copy of a frozen TextEncoder with one more row in its token table, for WORD: the mean of the four shape words'
    embeddings plus a little noise (so 'star' starts as 'some shape', distinct from each). The original is untouched."""
    import copy

    if encoder.config.get("vocab_size") != len(VOCAB):
        raise ValueError(f"expected lesson 7's text encoder ({len(VOCAB)} tokens), got vocab_size "
                         f"{encoder.config.get('vocab_size')}")
    out = copy.deepcopy(encoder)
    old = encoder.tokens.weight.detach()
    shape_rows = old[[VOCAB.index(s) for s in SHAPES]]
    g = torch.Generator().manual_seed(seed)
    new = shape_rows.mean(0) + 0.1 * shape_rows.std(0) * torch.randn(old.shape[1], generator=g).to(old)
    out.tokens = nn.Embedding(len(VOCAB) + 1, old.shape[1]).to(old.device, old.dtype)
    out.tokens.weight.data.copy_(torch.cat([old, new[None]]))
    out.config = {**encoder.config, "vocab_size": len(VOCAB) + 1}
    return out.eval().requires_grad_(False)


def _seed(purpose: str, seed: int) -> int:
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    return int.from_bytes(hashlib.sha256(f"concept/{purpose}/{seed}".encode()).digest()[:7], "big")


def concept_scenes(n: int, purpose: str = "adapt", seed: int = 0) -> list[dict]:
    """n one-object scenes of the new shape: colour, size and position drawn uniformly (the shapes generator's
    jitter), from a generator of its own per (purpose, seed)."""
    from .shapes import _centre, _choice

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    g = torch.Generator().manual_seed(_seed(purpose, seed))
    scenes = []
    for _ in range(n):
        colour, size = tuple(COLOURS)[_choice(COLOURS, g)], tuple(SIZES)[_choice(SIZES, g)]
        pos = tuple(POSITIONS)[_choice(POSITIONS, g)]
        obj = {"shape": WORD, "colour": colour, "size": size, "position": pos, "centre": _centre(POSITIONS[pos], g)}
        scenes.append({"objects": [obj], "relation": None})
    return scenes


def make_concept(n: int, purpose: str = "adapt", seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """n captioned images of the new shape ('a small red star at the top left'): (images (n, 3, 32, 32) in [-1, 1],
    captions); the same arguments give the same bytes anywhere."""
    scenes = concept_scenes(n, purpose, seed)
    captions = [f"a {o['size']} {o['colour']} {WORD} at the {o['position']}" for o in (s["objects"][0] for s in scenes)]
    return torch.stack([render(s) for s in scenes]), captions


def concept_prompts(n: int, seed: int = 0) -> list[str]:
    """n test prompts naming the new shape with a colour, size and position (from the 'test' generator)."""
    return make_concept(n, "test", seed)[1]


# ---- the judge: the shipped classifier's trunk, frozen, and a new shape head that reads five shapes ------------------


class ConceptJudge(nn.Module):
    """An attribute classifier that also reads the new shape: its frozen trunk and heads (count, colour, size,
    position, relation, ...) and a new head over the trunk's 256 features giving 5-way 'shape' and 'shape2'."""

    def __init__(self, classifier: nn.Module, hidden: int = 128):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.config = {"kind": "concept_judge", "hidden": hidden, "shapes": list(ALL_SHAPES)}
        k = len(ALL_SHAPES)
        self.shape_head = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, 2 * k))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.classifier.features(x)
        out = {k: head(f) for k, head in self.classifier.heads.items()}
        out["shape"], out["shape2"] = self.shape_head(f).chunk(2, dim=1)
        return out


@functools.lru_cache(maxsize=2)
def _judge_data(n_old: int, n_new: int, seed: int):
    from .attributes import dataset

    images, _, labels = dataset(n_old, "train", seed + 101)  # seeds no generator of the course trains on
    extra, _, extra_labels = dataset(n_old // 5, "heldout", seed + 107)
    stars = make_concept(n_new, "judge", seed)[0]
    x = torch.cat([images, extra, stars])
    shape = torch.cat([labels["shape"], extra_labels["shape"], torch.full((n_new,), len(SHAPES))])
    shape2 = torch.cat([labels["shape2"], extra_labels["shape2"], torch.full((n_new,), -1)])
    return x, shape, shape2


def train_concept_judge(steps: int = 1500, n_old: int = 10_000, n_new: int = 3000, batch_size: int = 512,
                        lr: float = 3e-3, seed: int = 0, progress: bool = True) -> tuple[ConceptJudge, dict]:
    """The new shape head on the shipped classifier's frozen features of rendered images (lesson 7's train and
    held-out-pair scenes, and stars from the 'judge' generator), with the same light noise as the classifier's own
    training; returns the judge and a card with its accuracy on the test split and on fresh stars."""
    from .attributes import load_attribute_classifier
    from .fit import fit

    torch.manual_seed(seed)
    judge = ConceptJudge(load_attribute_classifier())
    x, shape, shape2 = _judge_data(n_old, n_new, seed)
    g = torch.Generator().manual_seed(seed)
    k = len(ALL_SHAPES)

    def loss_fn(step):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        noisy = x[idx] + 0.08 * torch.rand(batch_size, 1, 1, 1, generator=g) * torch.randn(
            batch_size, 3, 32, 32, generator=g)
        with torch.no_grad():
            f = judge.classifier.features(noisy)
        out = judge.shape_head(f)
        return F.cross_entropy(out[:, :k], shape[idx]) + F.cross_entropy(out[:, k:], shape2[idx], ignore_index=-1)

    judge, log = fit(judge, loss_fn, steps, lr=lr, desc="concept judge", progress=progress,
                     params=judge.shape_head.parameters())
    card = {"steps": steps, "seed": seed, "old_images": n_old + n_old // 5, "new_images": n_new,
            "train_seconds": round(log["seconds"], 1), **judge_accuracy(judge)}
    return judge, card


@torch.no_grad()
def judge_accuracy(judge: ConceptJudge, n: int = 1000) -> dict:
    """The judge on rendered images it never saw: every attribute on lesson 7's test split, and shape, colour, size
    and position on fresh stars (the 'test' generator)."""
    from .attributes import dataset
    from .shapes import scene_labels

    images, _, labels = dataset(2 * n, "test", 0)
    pred = predict(judge, images)
    test = {k: round((pred[k] == labels[k])[labels[k] >= 0].float().mean().item(), 4) for k in labels
            if (labels[k] >= 0).any()}
    scenes = concept_scenes(n, "test", 1)
    stars = torch.stack([render(s) for s in scenes])
    want = scene_labels([{**s, "objects": [{**s["objects"][0], "shape": SHAPES[0]}]} for s in scenes])
    got = predict(judge, stars)
    star = {"shape": round((got["shape"] == len(SHAPES)).float().mean().item(), 4)}
    for key in ("colour", "size", "position"):
        star[key] = round((got[key] == want[key]).float().mean().item(), 4)
    return {"test_accuracy": test, "star_accuracy": star, "test_images": 2 * n, "star_images": n}


@torch.no_grad()
def predict(judge: ConceptJudge, images: torch.Tensor, batch: int = 500) -> dict[str, torch.Tensor]:
    """The predicted class per attribute ('shape' and 'shape2' among ALL_SHAPES)."""
    outs = [judge(images[i:i + batch].float().cpu()) for i in range(0, len(images), batch)]
    return {k: torch.cat([o[k] for o in outs]).argmax(1) for k in outs[0]}
