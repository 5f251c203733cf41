"""Cross-attention from image features to caption tokens, and the text-conditioned UNet built with it (Rombach et al.
2022, sec. 3.3, eq. 3: Attention(Q, K, V) with Q from the image, K and V from the text encoder's token states)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import _batch_t, _check_prediction, timestep_embedding
from .unet import ResBlock, SelfAttention, _groups


class CrossAttention(nn.Module):
    """x (B, C, H, W) attends to context (B, L, D): softmax(Q K^T / sqrt(d)) V per head, masked keys ignored, added
    back to x through a zero-initialised output projection (so a new block starts as the identity)."""

    def __init__(self, channels: int, context_dim: int, heads: int = 4, groups: int = 8):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.q = nn.Linear(channels, channels, bias=False)
        self.k = nn.Linear(context_dim, channels, bias=False)
        self.v = nn.Linear(context_dim, channels, bias=False)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        # attention(x, context, mask, w_q, w_k, w_v, heads) -> (B, HW, C) to use instead of torch's fused attention
        # (lesson 7's exercise signature): the capstone plugs a learner's own in with use_attention
        self.attend = None

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.k.in_features:
            raise ValueError(f"context must have shape ({b}, L, {self.k.in_features}), got {tuple(context.shape)}")
        attn_mask = None
        if mask is not None:
            if mask.shape != context.shape[:2]:
                raise ValueError(f"mask must have shape {tuple(context.shape[:2])}, got {tuple(mask.shape)}")
            if not mask.any(1).all():
                raise ValueError("every row of the mask needs at least one True (attendable) token")
            attn_mask = mask.bool()[:, None, None, :]  # (B, 1, 1, L): True = attend
        d = c // self.heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        if self.attend is not None:
            valid = mask.bool() if mask is not None else torch.ones(context.shape[:2], dtype=torch.bool,
                                                                    device=x.device)
            out = self.attend(tokens, context, valid, self.q.weight, self.k.weight, self.v.weight, self.heads)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (b, h * w, c):
                raise ValueError(f"the attention function must return a tensor of shape {(b, h * w, c)}, got "
                                 f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
            out = self.proj(out)
        else:
            q = self.q(tokens).view(b, h * w, self.heads, d).transpose(1, 2)
            k = self.k(context).view(b, -1, self.heads, d).transpose(1, 2)
            v = self.v(context).view(b, -1, self.heads, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, HW, d)
            out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


def use_attention(model: nn.Module, attention) -> int:
    """Make every CrossAttention in `model` compute its attention with `attention(x, context, mask, w_q, w_k, w_v,
    heads)` (None: torch's fused attention again); returns how many layers now use it."""
    if attention is not None and not callable(attention):
        raise TypeError(f"attention must be a function (or None), got {type(attention).__name__}")
    layers = [m for m in model.modules() if isinstance(m, CrossAttention)]
    for m in layers:
        m.attend = attention
    return len(layers)


class TextUNet(nn.Module):
    """The UNet of lesson 5 with cross-attention to caption tokens after every residual block (the LDM denoiser).

    Called as model(x_t, t, context=states, mask=valid), with the text encoder's states (B, L, context_dim) and its
    valid-token mask; `in_channels` is 4 for latents of the shipped autoencoder, 3 for pixels. Self-attention sits at
    the lowest resolution only.
    """

    def __init__(self, in_channels: int = 4, base: int = 64, mults=(1, 2), num_res: int = 1, heads: int = 4,
                 groups: int = 8, context_dim: int = 64, prediction: str = "eps"):
        super().__init__()
        _check_prediction(prediction)
        mults = [int(m) for m in mults]
        if not mults or num_res < 1 or base < 1:
            raise ValueError("need at least one resolution level, num_res >= 1 and base >= 1")
        self.config = dict(kind="text_unet", in_channels=in_channels, base=base, mults=mults, num_res=num_res,
                           heads=heads, groups=groups, context_dim=context_dim, prediction=prediction)
        self.prediction, self.base = prediction, base
        emb_dim, last = 4 * base, len(mults) - 1
        self.time = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_channels, base, 3, padding=1)

        def block(cin, cout, level):
            layers = [ResBlock(cin, cout, emb_dim, groups, 0.0)]
            if level == last:
                layers.append(SelfAttention(cout, heads, groups))
            layers.append(CrossAttention(cout, context_dim, heads, groups))
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
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, groups, 0.0), SelfAttention(ch, heads, groups),
                                  CrossAttention(ch, context_dim, heads, groups), ResBlock(ch, ch, emb_dim, groups, 0.0)])
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

    def _run(self, layers, h, emb, context, mask):  # not `_apply`: that is nn.Module.to()'s
        for sub in layers:
            h = sub(h, context, mask) if isinstance(sub, CrossAttention) else sub(h, emb)
        return h

    def forward(self, x: torch.Tensor, t, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                y=None, control: list | None = None) -> torch.Tensor:
        """`control`: a ControlNet's residuals (course_lib.controlnet), one per skip connection and one for the middle,
        added to them before the up path (Zhang et al. 2023, eq. 4)."""
        c, factor = self.config["in_channels"], 2 ** (len(self.config["mults"]) - 1)
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"expected inputs of shape (B, {c}, H, W) with H and W divisible by {factor}, "
                             f"got {tuple(x.shape)}")
        if context is None:
            raise ValueError("a text-conditioned UNet needs context= (the text encoder's token states) and mask=; "
                             "for the unconditional prediction pass the empty caption's states")
        if y is not None:
            raise ValueError("a text-conditioned UNet takes captions (context=, mask=), not class labels y")
        emb = F.silu(self.time(timestep_embedding(_batch_t(t, x), self.base).to(x.dtype)))
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            h = self._run(layer, h, emb, context, mask) if isinstance(layer, nn.ModuleList) else layer(h)
            hs.append(h)
        h = self._run(self.mid, h, emb, context, mask)
        if control is not None:
            if len(control) != len(hs) + 1:
                raise ValueError(f"control needs {len(hs) + 1} residuals (one per skip connection and the middle), "
                                 f"got {len(control)}")
            hs = [a + b for a, b in zip(hs, control[:-1])]
            h = h + control[-1]
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = self._run(layer, torch.cat([h, hs.pop()], dim=1), emb, context, mask)
            else:
                h = layer(h)
        return self.out(h)
