"""A Diffusion Transformer (Peebles & Xie 2023): patchify, transformer blocks conditioned by adaLN-Zero on the time
step (and class label), optional cross-attention to caption tokens (as PixArt-alpha, Chen et al. 2024), unpatchify."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import _batch_t, _check_prediction, _Labels, timestep_embedding


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C): patches in row-major order, each flattened as (p, p, C)."""
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"image side ({h}x{w}) must be divisible by the patch size {p}")
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, h: int, w: int) -> torch.Tensor:
    """The inverse of patchify: (B, H/p * W/p, p * p * C) -> (B, C, H, W)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, h, w)


def sincos_2d(dim: int, gh: int, gw: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embeddings (gh * gw, dim): the first half of the channels encodes the column,
    the second the row, each as [sin, cos] (Peebles & Xie 2023, as in MAE; the same numbers as diffusers')."""
    if dim % 4:
        raise ValueError(f"the hidden size ({dim}) must be divisible by 4 for 2D sin-cos position embeddings")
    def axis(n, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)
    rows, cols = axis(gh, dim // 2), axis(gw, dim // 2)
    return torch.cat([cols[None].expand(gh, gw, -1), rows[:, None].expand(gh, gw, -1)], -1).reshape(gh * gw, dim).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, D) shift and scale broadcast over the tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm self-attention and MLP, each scaled, shifted and gated by values regressed from the conditioning
    vector c (adaLN-Zero: the regression is zero-initialised, so a new block is the identity); optionally a
    cross-attention sublayer to caption tokens between them."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, int(hidden * mlp_ratio)), nn.GELU(approximate="tanh"),
                                 nn.Linear(int(hidden * mlp_ratio), hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)
        self.cross = None
        if context_dim:
            self.norm_c = nn.LayerNorm(hidden, eps=1e-6)
            self.cross = nn.MultiheadAttention(hidden, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
            nn.init.zeros_(self.cross.out_proj.weight)
            nn.init.zeros_(self.cross.out_proj.bias)

    def forward(self, x, c, context=None, mask=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1[:, None] * self.attn(h, h, h, need_weights=False)[0]
        if self.cross is not None:
            h = self.norm_c(x)
            x = x + self.cross(h, context, context, key_padding_mask=None if mask is None else ~mask.bool(),
                               need_weights=False)[0]
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """model(x, t, y=None, context=None, mask=None): images or latents (B, C, H, W) -> the prediction, same shape.

    `patch` is the patch side p (tokens: H W / p^2); `num_classes` adds a label embedding with a 'no label' index (as
    the UNet's); `context_dim` adds cross-attention to caption tokens (lesson 7's text encoder states)."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, patch: int = 2, hidden: int = 128, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, num_classes: int | None = None,
                 context_dim: int | None = None, prediction: str = "eps"):
        super().__init__()
        _check_prediction(prediction)
        if image_size % patch:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch ({patch})")
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.config = dict(kind="dit", in_channels=in_channels, image_size=image_size, patch=patch, hidden=hidden,
                           depth=depth, heads=heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
                           context_dim=context_dim, prediction=prediction)
        self.prediction, self.patch, self.hidden = prediction, patch, hidden
        self.embed = nn.Linear(patch * patch * in_channels, hidden)
        grid = image_size // patch
        self.register_buffer("pos", sincos_2d(hidden, grid, grid), persistent=False)
        self.time = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.labels = _Labels(num_classes, hidden)
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio, context_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, patch * patch * in_channels)
        for layer in (self.ada[-1], self.out):  # adaLN-Zero: the network starts by predicting zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t, y=None, context=None, mask=None) -> torch.Tensor:
        cfg = self.config
        side = cfg["image_size"]
        if x.ndim != 4 or x.shape[1:] != (cfg["in_channels"], side, side):
            raise ValueError(f"expected inputs of shape (B, {cfg['in_channels']}, {side}, {side}), got {tuple(x.shape)}")
        if (context is None) != (cfg["context_dim"] is None):
            raise ValueError("this DiT " + ("needs context= (caption token states) and mask=" if cfg["context_dim"]
                                            else "has no cross-attention (context_dim=None) but was given context"))
        # frequencies 10000^(-k / 127), as diffusers' DiT (downscale_freq_shift=1), so that weights carry over exactly
        c = self.time(timestep_embedding(_batch_t(t, x), 256, freq_shift=1.0).to(x.dtype)) + self.labels(y, x.shape[0], x.device)
        h = self.embed(patchify(x, self.patch)) + self.pos
        for block in self.blocks:
            h = block(h, c, context, mask)
        shift, scale = self.ada(c).chunk(2, dim=1)
        h = self.out(modulate(self.norm(h), shift, scale))
        return unpatchify(h, self.patch, cfg["in_channels"], side, side)


def dit_flops(config: dict, context_tokens: int | None = None) -> float:
    """Training-free cost of one forward pass of one image through a DiT config, in FLOPs (2 per multiply-add): per
    block the qkv and output projections (4 n d^2), attention scores and mixing (2 n^2 d), the MLP (2 r n d^2) and the
    adaLN regression (6 d^2), plus the final adaLN regression (2 d^2) and projection (n d p^2 C); patch embedding and
    time MLP left out, as in Peebles & Xie 2023, table 1. A text DiT (context_dim set) also pays, per block, for its
    cross-attention to `context_tokens` caption tokens of width c: the query and output projections (2 n d^2), the key
    and value projections of the caption (2 L c d), scores and mixing (2 n L d)."""
    n = (config["image_size"] // config["patch"]) ** 2
    d, r = config["hidden"], config["mlp_ratio"]
    per_block = 4 * n * d * d + 2 * n * n * d + 2 * r * n * d * d + 6 * d * d
    c = config.get("context_dim")
    if c:
        if not context_tokens or context_tokens < 1:
            raise ValueError("a text DiT's cost depends on the caption's length: pass context_tokens")
        per_block += 2 * n * d * d + 2 * context_tokens * c * d + 2 * n * context_tokens * d
    return 2.0 * (config["depth"] * per_block + 2 * d * d + n * d * config["patch"] ** 2 * config["in_channels"])
