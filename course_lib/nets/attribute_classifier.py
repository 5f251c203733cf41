"""The attribute classifier of the shapes dataset: one conv trunk, one linear head per attribute (count, shape,
colour, size, position, second shape and colour, relation); it judges generated images (prompt adherence, FD)."""
from __future__ import annotations

import torch
from torch import nn


class AttributeClassifier(nn.Module):
    """(B, 3, 32, 32) images -> {attribute: logits}; `features` gives the 256-d penultimate layer (for FD)."""

    def __init__(self, heads: dict, base: int = 32):
        super().__init__()
        self.config = dict(kind="attribute_classifier", heads=dict(heads), base=base)
        self.body = nn.Sequential(
            nn.Conv2d(3, base, 3, padding=1), nn.SiLU(), nn.Conv2d(base, base, 3, padding=1), nn.SiLU(),
            nn.Conv2d(base, 2 * base, 3, stride=2, padding=1), nn.SiLU(),       # 16x16
            nn.Conv2d(2 * base, 4 * base, 3, stride=2, padding=1), nn.SiLU(),   # 8x8
            nn.Conv2d(4 * base, 4 * base, 3, stride=2, padding=1), nn.SiLU(),   # 4x4
            nn.Flatten(), nn.Linear(64 * base, 256), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, int(n)) for k, n in heads.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (3, 32, 32):
            raise ValueError(f"expected images of shape (B, 3, 32, 32), got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}
