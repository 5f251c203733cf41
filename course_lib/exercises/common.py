"""Helpers the value-graded exercises share: random batch shapes and per-sample broadcasting."""
from __future__ import annotations

import torch

_RESHAPE_HINT = ("A per-sample value of shape (B,) must be reshaped to broadcast over the other "
                 "dimensions, e.g. v.view(-1, *[1] * (x.ndim - 1)).")


def _batch(gen: torch.Generator) -> tuple[int, tuple]:
    b = int(torch.randint(3, 7, (1,), generator=gen))
    shape = [(b, 2), (b, 1, 8, 8), (b, 3, 5, 4)][int(torch.randint(3, (1,), generator=gen))]
    return b, shape


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))
