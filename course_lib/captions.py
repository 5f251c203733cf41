"""Lesson 10's text data: the shapes captions as token sequences (lesson 7's grammar, no images rendered), a [MASK]
token for masked diffusion, and the measures of generated text: validity (the grammar parses it), distinct and
unseen valid captions."""
from __future__ import annotations

import torch

from .shapes import MAX_WORDS, SPLITS, VOCAB, _scene, _split_seed, caption, detokenize, parse_caption, tokenize

PAD_ID = 0
MASK_ID = len(VOCAB)            # one id past the words: the absorbing state of masked diffusion
VOCAB_SIZE = len(VOCAB) + 1     # words, padding and [MASK]


def caption_corpus(n: int, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """n captions of a split as (n, MAX_WORDS) token ids (padded with PAD_ID) and as text: the same scenes, in the same
    order, as shapes.make_shapes(n, split, seed) captions, without rendering a pixel."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    gen = torch.Generator().manual_seed(_split_seed(split, seed))
    texts = [caption(_scene(gen, split)) for _ in range(n)]
    return tokenize(texts, MAX_WORDS), texts


def decode(tokens: torch.Tensor) -> list[str | None]:
    """Token rows back to text; None for a row that is not a caption: a [MASK] or an out-of-range id anywhere, or a
    word after padding (a caption is its words, then only padding)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (n, length), got {tuple(tokens.shape)}")
    out = []
    for row in tokens.tolist():
        n_words = next((i for i, v in enumerate(row) if v == PAD_ID), len(row))
        bad = any(not 0 <= v < len(VOCAB) for v in row) or any(v != PAD_ID for v in row[n_words:])
        out.append(None if bad or n_words == 0 else detokenize(torch.tensor([row[:n_words]]))[0])
    return out


def is_valid(text: str | None) -> bool:
    """Whether the grammar parses a caption (lesson 7's parse_caption) and it is one the data could hold: a single
    object with its size and position, or two objects in a relation."""
    if text is None:
        return False
    try:
        p = parse_caption(text)
    except ValueError:
        return False
    if p["relation"] is None:
        return {"size", "position"} <= set(p["objects"][0])
    return all("size" not in o and "position" not in o for o in p["objects"])


def text_quality(tokens: torch.Tensor, training: set[str] | None = None) -> dict:
    """The measures of lesson 10 on generated token rows: the share that are valid captions, how many distinct valid
    captions, and (given the training captions) how many valid ones never occur in training."""
    texts = decode(tokens)
    valid = [t for t in texts if is_valid(t)]
    out = {"samples": len(texts), "validity": len(valid) / max(len(texts), 1), "distinct": len(set(valid))}
    if training is not None:
        out["unseen"] = len(set(valid) - set(training))
    return out


def show(tokens: torch.Tensor) -> list[str]:
    """Token rows as readable text, partly masked or not: words, [MASK] for the absorbing state, _ for padding."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (n, length), got {tuple(tokens.shape)}")
    names = {**dict(enumerate(VOCAB)), PAD_ID: "_", MASK_ID: "[MASK]"}
    return [" ".join(names.get(v, f"<{v}?>") for v in row) for row in tokens.tolist()]
