"""A noise-aware classifier p(y | x_t, t) for 8x8 images (Dhariwal & Nichol 2021, sec. 4): the UNet's down path and
time embedding, pooled to class logits. Trained on noised digits, it steers an unconditional model (classifier guidance)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import _batch_t, timestep_embedding
from .unet import ResBlock, _groups


class NoisyClassifier(nn.Module):
    """clf(x_t, t) -> (B, num_classes) logits; x_t in the alpha-bar view, t integer or fractional timesteps."""

    def __init__(self, in_channels: int = 1, base: int = 32, num_classes: int = 10, groups: int = 8):
        super().__init__()
        if num_classes < 2 or base < 1:
            raise ValueError(f"need num_classes >= 2 and base >= 1, got {num_classes} and {base}")
        self.config = dict(kind="noisy_classifier", in_channels=in_channels, base=base, num_classes=num_classes,
                           groups=groups)
        emb = 4 * base
        self.base = base
        self.time = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.stem = nn.Conv2d(in_channels, base, 3, padding=1)
        self.block1 = ResBlock(base, base, emb, groups, 0.0)                       # 8x8
        self.down = nn.Conv2d(base, 2 * base, 3, stride=2, padding=1)               # 4x4
        self.block2 = ResBlock(2 * base, 2 * base, emb, groups, 0.0)
        self.norm = nn.GroupNorm(_groups(2 * base, groups), 2 * base)
        self.head = nn.Linear(2 * base, num_classes)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        c = self.config["in_channels"]
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"expected images of shape (B, {c}, H, W) with even H and W, got {tuple(x.shape)}")
        e = F.silu(self.time(timestep_embedding(_batch_t(t, x), self.base).to(x.dtype)))
        h = self.block1(self.stem(x), e)
        h = self.block2(self.down(h), e)
        return self.head(F.silu(self.norm(h)).mean(dim=(2, 3)))
