"""Lesson 13's new concept: a shape the shapes model never saw (a five-pointed star), its captioned images, a new
word for it in the text encoder's vocabulary (the placeholder token of textual inversion, Gal et al. 2023; the
identifier of DreamBooth, Ruiz et al. 2023), and a judge that reads it.

The word is appended to the vocabulary (index len(VOCAB)), so every old caption tokenizes exactly as before; it may
stand wherever a shape does ('a small red star at the top left', 'a red star left of a blue square').
The judge is the shipped attribute classifier's frozen trunk with a new shape head that reads five shapes, trained on
rendered images only (seeds no adapted model sees), so it judges generated stars without having learnt from them.
"""
from __future__ import annotations

import functools
import hashlib
import time

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
    """An attribute classifier that also reads the new shape: its frozen trunk and heads (count, colour, position,
    relation, ...) and a new head over the trunk's 256 features giving 5-way 'shape' and 'shape2', and 'size' (the
    old size head reads a star's size poorly: its points make a small star look larger)."""

    def __init__(self, classifier: nn.Module, hidden: int = 128):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.config = {"kind": "concept_judge", "hidden": hidden, "shapes": list(ALL_SHAPES)}
        k = len(ALL_SHAPES)
        self.shape_head = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, 2 * k + len(SIZES)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.classifier.features(x)
        out = {k: head(f) for k, head in self.classifier.heads.items()}
        k = len(ALL_SHAPES)
        new = self.shape_head(f)
        out["shape"], out["shape2"], out["size"] = new[:, :k], new[:, k:2 * k], new[:, 2 * k:]
        return out


@functools.lru_cache(maxsize=2)
def _judge_data(n_old: int, n_new: int, seed: int):
    from .attributes import dataset

    images, _, labels = dataset(n_old, "train", seed + 101)  # seeds no generator of the course trains on
    extra, _, extra_labels = dataset(n_old // 5, "heldout", seed + 107)
    scenes = concept_scenes(n_new, "judge", seed)
    stars = torch.stack([render(s) for s in scenes])
    x = torch.cat([images, extra, stars])
    shape = torch.cat([labels["shape"], extra_labels["shape"], torch.full((n_new,), len(SHAPES))])
    shape2 = torch.cat([labels["shape2"], extra_labels["shape2"], torch.full((n_new,), -1)])
    size = torch.cat([labels["size"], extra_labels["size"],
                      torch.tensor([tuple(SIZES).index(s["objects"][0]["size"]) for s in scenes])])
    return x, shape, shape2, size


def train_concept_judge(steps: int = 1500, n_old: int = 10_000, n_new: int = 3000, draws: int = 3,
                        batch_size: int = 512, lr: float = 3e-3, seed: int = 0, progress: bool = True
                        ) -> tuple[ConceptJudge, dict]:
    """The new shape head on the shipped classifier's frozen features of rendered images (lesson 7's train and
    held-out-pair scenes, and stars from the 'judge' generator), each image seen under `draws` draws of the light noise
    the classifier itself was trained with (the features are computed once per draw: the trunk is frozen); returns
    the judge and a card with its accuracy on lesson 7's test split and on fresh stars."""
    from .attributes import load_attribute_classifier
    from .fit import fit

    torch.manual_seed(seed)
    judge = ConceptJudge(load_attribute_classifier())
    x, shape, shape2, size = _judge_data(n_old, n_new, seed)
    g = torch.Generator().manual_seed(seed)
    feats, start = [], time.perf_counter()
    with torch.no_grad():
        for _ in range(draws):
            noisy = x + 0.08 * torch.rand(len(x), 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
            feats.append(torch.cat([judge.features(noisy[i:i + 1000]) for i in range(0, len(x), 1000)]))
    feats, feature_seconds = torch.stack(feats), time.perf_counter() - start
    k = len(ALL_SHAPES)

    def loss_fn(step):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        out = judge.shape_head(feats[step % draws, idx])
        return (F.cross_entropy(out[:, :k], shape[idx]) + F.cross_entropy(out[:, k:2 * k], shape2[idx], ignore_index=-1)
                + F.cross_entropy(out[:, 2 * k:], size[idx], ignore_index=-1))

    judge, log = fit(judge, loss_fn, steps, lr=lr, desc="concept judge", progress=progress,
                     params=judge.shape_head.parameters())
    judge.eval().requires_grad_(False)
    card = {"steps": steps, "seed": seed, "old_images": n_old + n_old // 5, "new_images": n_new, "noise_draws": draws,
            "feature_seconds": round(feature_seconds, 1), "train_seconds": round(log["seconds"] + feature_seconds, 1),
            **judge_accuracy(judge)}
    return judge, card


def export_judge(judge: ConceptJudge, path, card: dict):
    """Write the judge's new head only (the trunk is the shipped classifier's), in the course checkpoint format."""
    from . import checkpoints as ckpt_io

    state = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": "weights",
             "config": {"preset": "shapes_star_judge"}, "model_config": judge.config,
             "weights": {k: v.detach().cpu() for k, v in judge.shape_head.state_dict().items()}, "card": card}
    return ckpt_io.save_atomic(state, path)


def load_concept_judge(path=None) -> ConceptJudge:
    """The shipped concept judge (data/shapes_star_judge.pt: the new head) on the shipped attribute classifier."""
    from . import checkpoints as ckpt_io
    from .attributes import load_attribute_classifier

    ckpt = ckpt_io.load_checkpoint(path or ckpt_io.shipped_dir() / "shapes_star_judge.pt")
    if ckpt.get("model_config", {}).get("kind") != "concept_judge":
        raise ValueError(f"{path} holds no concept judge (kind {ckpt.get('model_config', {}).get('kind')!r})")
    judge = ConceptJudge(load_attribute_classifier(), ckpt["model_config"]["hidden"])
    judge.shape_head.load_state_dict(ckpt["weights"])
    return judge.eval().requires_grad_(False)


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


def prompt_labels(prompts) -> dict[str, torch.Tensor]:
    """attributes.prompt_labels for prompts that may name the new shape (its index len(SHAPES) among ALL_SHAPES)."""
    from .attributes import prompt_labels as old_labels

    prompts = list(prompts)
    named = [[w == WORD for w in prompt_words(p)] for p in prompts]
    out = old_labels([" ".join(_STAND_IN if w == WORD else w for w in prompt_words(p)) for p in prompts])
    for i, (p, flags) in enumerate(zip(prompts, named)):
        words = prompt_words(p)
        shape_slots = [j for j, w in enumerate(words) if w in ALL_SHAPES]
        for slot, key in zip(shape_slots, ("shape", "shape2")):
            if flags[slot]:
                out[key][i] = len(SHAPES)
    return out


def concept_adherence(judge: ConceptJudge, images: torch.Tensor, prompts) -> dict[str, float]:
    """How generated images follow one-object prompts that may name the new shape, as the concept judge reads them:
    accuracy per named attribute ('shape' is the concept's fidelity for star prompts) and 'all'."""
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    want, pred = prompt_labels(prompts), predict(judge, images)
    if (want["count"] != 0).any():
        raise ValueError("concept_adherence judges one-object prompts ('a small red star at the top left')")
    out, ok = {}, torch.ones(len(prompts), dtype=torch.bool)
    for k in ("shape", "colour", "size", "position"):
        named = want[k] >= 0
        right = (pred[k] == want[k]) | ~named
        ok &= right
        if named.any():
            out[k] = round(right[named].float().mean().item(), 4)
    out["all"] = round(ok.float().mean().item(), 4)
    return out
