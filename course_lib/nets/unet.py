"""A small DDPM-style UNet for images (Ho et al. 2020, app. B): residual blocks, GroupNorm, attention at the lowest level."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import group_norm_silu
from .blocks import _batch_t, _check_prediction, _Labels, timestep_embedding


def _groups(channels: int, groups: int) -> int:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added in between, 1x1 skip when channels change (Ho et al. 2020)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin, groups), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout, groups), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(group_norm_silu(x, self.norm1)) + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(group_norm_silu(h, self.norm2)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb=None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """A small DDPM-style UNet: residual blocks, GroupNorm, sinusoidal time embedding, attention at the lowest resolution.

    `mults` gives the channel multiplier per resolution; the image side must be divisible by 2**(len(mults)-1)
    (mults=(1, 2, 2) works at 8x8, 28x28 and 32x32).
    """

    def __init__(self, in_channels: int = 1, base: int = 64, mults=(1, 2, 2), num_res: int = 2, heads: int = 4,
                 groups: int = 8, dropout: float = 0.0, num_classes: int | None = None, prediction: str = "eps"):
        super().__init__()
        _check_prediction(prediction)
        mults = tuple(int(m) for m in mults)
        if not mults or num_res < 1 or base < 1:
            raise ValueError("need at least one resolution level, num_res >= 1 and base >= 1")
        self.config = dict(kind="unet", in_channels=in_channels, base=base, mults=list(mults), num_res=num_res,
                           heads=heads, groups=groups, dropout=dropout, num_classes=num_classes,
                           prediction=prediction)
        self.prediction = prediction
        emb_dim = 4 * base
        self.base = base
        self.time = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.labels = _Labels(num_classes, emb_dim)
        self.stem = nn.Conv2d(in_channels, base, 3, padding=1)
        last = len(mults) - 1

        def block(cin, cout, level):
            layers = [ResBlock(cin, cout, emb_dim, groups, dropout)]
            if level == last:
                layers.append(SelfAttention(cout, heads, groups))
            return nn.ModuleList(layers)

        self.down, skips, ch = nn.ModuleList(), [base], base
        for level, m in enumerate(mults):
            for _ in range(num_res):
                self.down.append(block(ch, base * m, level))
                ch = base * m
                skips.append(ch)
            if level != last:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, groups, dropout), SelfAttention(ch, heads, groups),
                                  ResBlock(ch, ch, emb_dim, groups, dropout)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mults))):
            for _ in range(num_res + 1):
                self.up.append(block(ch + skips.pop(), base * m, level))
                ch = base * m
            if level != 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch, groups), ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
        c, factor = self.config["in_channels"], 2 ** (len(self.config["mults"]) - 1)
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"expected images of shape (B, {c}, H, W) with H and W divisible by {factor}, "
                             f"got {tuple(x.shape)}")
        emb = self.time(timestep_embedding(_batch_t(t, x), self.base).to(x.dtype)) + self.labels(y, x.shape[0], x.device)
        emb = F.silu(emb)
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                for sub in layer:
                    h = sub(h, emb)
            else:
                h = layer(h)
            hs.append(h)
        for sub in self.mid:
            h = sub(h, emb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)
                for sub in layer:
                    h = sub(h, emb)
            else:
                h = layer(h)
        return self.out(h)
