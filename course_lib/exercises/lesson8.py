"""Lesson 8: adaLN modulation, patchify / unpatchify, and a whole DiT block (Peebles & Xie 2023), graded on values."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import LIBRARY_EQUIVALENTS, Exercise, register
from .common import ATTENTION_LIBRARIES, ATTENTION_RULE

EPS = 1e-6  # the LayerNorm epsilon of DiT (and of diffusers' DiT)


def _ln(x, eps=EPS, unbiased=False):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=unbiased)
    return (x - mean) / torch.sqrt(var + eps)


def ref_adaln(x, shift, scale):
    """adaLN (Peebles & Xie 2023, sec. 3.2): LayerNorm over the channels with no learned affine (eps 1e-6), then
    x * (1 + scale) + shift, the (B, D) shift and scale regressed from the conditioning and broadcast over the tokens."""
    return _ln(x) * (1 + scale[:, None]) + shift[:, None]


def _inputs_adaln(gen):
    b, n, d = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((2, 5), (3, 10), (4, 17)))
    f = dict(generator=gen, dtype=torch.float64)
    return {"x": 3 * torch.randn(b, n, d, **f) + 1, "shift": torch.randn(b, d, **f), "scale": torch.randn(b, d, **f)}


def ref_patchify(x, p):
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C): non-overlapping p x p patches in row-major order (left to right,
    then top to bottom), each flattened as (row in patch, column in patch, channel), as DiT's patch embedding."""
    b, c, h, w = x.shape
    patches = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, H/p, W/p, p, p)
    return patches.permute(0, 2, 3, 4, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def ref_unpatchify(tokens, p, channels, h, w):
    """The inverse of patchify: (B, H/p * W/p, p * p * C) -> (B, C, H, W)."""
    b = tokens.shape[0]
    grid = tokens.reshape(b, h // p, w // p, p, p, channels)  # (B, rows, cols, row in patch, col in patch, C)
    return grid.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h, w)


def _inputs_patchify(gen):
    p = int((1, 2, 4)[int(torch.randint(3, (1,), generator=gen))])
    b, c = int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(2, 4, (1,), generator=gen))
    gh, gw = int(torch.randint(2, 4, (1,), generator=gen)), int(torch.randint(2, 4, (1,), generator=gen))
    p = 2 if p == 1 else p  # patch 1 hides most layout mistakes
    return {"x": torch.randn(b, c, gh * p, gw * p, generator=gen, dtype=torch.float64), "p": p}


def _inputs_unpatchify(gen):
    inputs = _inputs_patchify(gen)
    b, c, h, w = inputs["x"].shape
    return {"tokens": ref_patchify(inputs["x"], inputs["p"]), "p": inputs["p"], "channels": c, "h": h, "w": w}


def _attention(h, qkv_w, qkv_b, proj_w, proj_b, heads):
    b, n, d = h.shape
    q, k, v = (h @ qkv_w.T + qkv_b).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) / (d // heads) ** 0.5).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, d) @ proj_w.T + proj_b


def _block(x, c, ada_w, ada_b, qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b, heads, gates=True,
           silu=True, one_plus=True, gelu="tanh", order=(0, 1, 2, 3, 4, 5)):
    mod = ((F.silu(c) if silu else c) @ ada_w.T + ada_b).chunk(6, dim=-1)
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[i] for i in order)
    if not gates:
        gate1 = gate2 = torch.ones_like(gate1)

    def modulate(t, shift, scale):
        return _ln(t) * ((1 + scale) if one_plus else scale)[:, None] + shift[:, None]

    x = x + gate1[:, None] * _attention(modulate(x, shift1, scale1), qkv_w, qkv_b, proj_w, proj_b, heads)
    hidden = F.gelu(modulate(x, shift2, scale2) @ fc1_w.T + fc1_b, approximate=gelu)
    return x + gate2[:, None] * (hidden @ fc2_w.T + fc2_b)


def ref_dit_block(x, c, ada_w, ada_b, qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b, heads):
    """One DiT block with adaLN-Zero (Peebles & Xie 2023, fig. 3): (shift1, scale1, gate1, shift2, scale2, gate2) =
    chunk6(SiLU(c) W_ada^T + b_ada); x += gate1 * Attn(adaLN(x; shift1, scale1)); x += gate2 * MLP(adaLN(x; shift2,
    scale2)), Attn multi-head self-attention (fused q, k, v projection, then an output projection), MLP two linear
    layers around a tanh-approximated GELU."""
    return _block(x, c, ada_w, ada_b, qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b, heads)


def _inputs_block(gen):
    heads = int((2, 4)[int(torch.randint(2, (1,), generator=gen))])
    d = heads * int(torch.randint(2, 5, (1,), generator=gen))
    b, n = int(torch.randint(2, 4, (1,), generator=gen)), int(torch.randint(3, 8, (1,), generator=gen))
    f = dict(generator=gen, dtype=torch.float64)

    def w(*shape, s=None):
        return torch.randn(*shape, **f) * (s if s is not None else shape[-1] ** -0.5)
    # a trained block: the adaLN regression is no longer zero (at zero every block is the identity: nothing to check)
    return {"x": torch.randn(b, n, d, **f), "c": torch.randn(b, d, **f), "ada_w": w(6 * d, d), "ada_b": w(6 * d, s=0.3),
            "qkv_w": w(3 * d, d), "qkv_b": w(3 * d, s=0.1), "proj_w": w(d, d), "proj_b": w(d, s=0.1),
            "fc1_w": w(4 * d, d), "fc1_b": w(4 * d, s=0.1), "fc2_w": w(d, 4 * d), "fc2_b": w(d, s=0.1), "heads": heads}


register(Exercise(
    "adaln", 8, ref_adaln, _inputs_adaln,
    "Normalise each token over its channels (subtract the mean over the last axis, divide by sqrt(variance + 1e-6), "
    "the biased variance as LayerNorm), then multiply by (1 + scale[:, None]) and add shift[:, None].",
    mistakes=((lambda x, shift, scale: x * (1 + scale[:, None]) + shift[:, None],
               "Normalise first: adaLN is a LayerNorm (no learned affine) whose scale and shift come from the "
               "conditioning."),
              (lambda x, shift, scale: _ln(x) * scale[:, None] + shift[:, None],
               "Multiply by (1 + scale): a zero regression (adaLN-Zero's start) must leave the normalised tokens as "
               "they are, not zero them."),
              (lambda x, shift, scale: (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, keepdim=True,
                                                                                         unbiased=False) + EPS)
               * (1 + scale[:, None]) + shift[:, None],
               "Normalise over the channels of each token (the last axis), not over the tokens."),
              (lambda x, shift, scale: _ln(x, unbiased=True) * (1 + scale[:, None]) + shift[:, None],
               "LayerNorm divides by the biased variance (mean of squared deviations, unbiased=False)."),
              (lambda x, shift, scale: _ln(x) * (1 + shift[:, None]) + scale[:, None],
               "shift is added and scale multiplies: x * (1 + scale) + shift.")),
    rtol=1e-6, atol=1e-8))
register(Exercise(
    "patchify", 8, ref_patchify, _inputs_patchify,
    "Reshape (B, C, H, W) to (B, C, H/p, p, W/p, p), permute to (B, H/p, W/p, p, p, C), reshape to "
    "(B, H/p * W/p, p * p * C).",
    mistakes=((lambda x, p: x.reshape(x.shape[0], -1, p * p * x.shape[1]),
               "A plain reshape mixes pixels from different patches: split H and W into (H/p, p) and (W/p, p) and "
               "permute before flattening."),
              (lambda x, p: F.unfold(x, p, stride=p).transpose(1, 2),
               "Each patch is flattened as (row, column, channel), channel last; F.unfold gives channel first."),
              (lambda x, p: ref_patchify(x.transpose(2, 3), p),
               "Patches go in row-major order: left to right along the first row of patches, then the next row; and "
               "inside a patch row by row."),),
    rtol=0, atol=0))
register(Exercise(
    "unpatchify", 8, ref_unpatchify, _inputs_unpatchify,
    "Reshape the tokens to (B, H/p, W/p, p, p, C), permute to (B, C, H/p, p, W/p, p), reshape to (B, C, H, W): "
    "unpatchify(patchify(x)) must give x back.",
    mistakes=((lambda tokens, p, channels, h, w: tokens.reshape(tokens.shape[0], channels, h, w),
               "A plain reshape puts channel values where pixels go: undo patchify's reshape and permute step by "
               "step."),
              (lambda tokens, p, channels, h, w: F.fold(tokens.transpose(1, 2), (h, w), p, stride=p),
               "Each token is laid out (row, column, channel), channel last; F.fold expects channel first."),),
    rtol=0, atol=0))
register(Exercise(
    "dit_block", 8, ref_dit_block, _inputs_block,
    "mod = silu(c) @ ada_w.T + ada_b, split in 6 along the last axis: shift1, scale1, gate1, shift2, scale2, gate2. "
    "h = adaln(x, shift1, scale1); q, k, v = (h @ qkv_w.T + qkv_b).chunk(3, -1); attention per head (d = D / heads, "
    "scores / sqrt(d), softmax over keys), heads merged, @ proj_w.T + proj_b; x = x + gate1[:, None] * that. Then "
    "h = adaln(x, shift2, scale2); x + gate2[:, None] * (gelu(h @ fc1_w.T + fc1_b, approximate='tanh') @ fc2_w.T "
    "+ fc2_b).",
    mistakes=((lambda **kw: _block(**kw, gates=False),
               "Scale each branch by its gate before adding it to x (the 'Zero' of adaLN-Zero: gates start at zero, "
               "so a new block is the identity)."),
              (lambda **kw: _block(**kw, silu=False), "Pass c through SiLU before the adaLN regression."),
              (lambda **kw: _block(**kw, one_plus=False), "Modulate with (1 + scale), not scale."),
              (lambda **kw: _block(**kw, gelu="none"), "DiT's MLP uses the tanh approximation of GELU "
               "(F.gelu(..., approximate='tanh'))."),
              (lambda **kw: _block(**kw, order=(1, 0, 2, 4, 3, 5)), "The six chunks are shift, scale, gate for the "
               "attention, then shift, scale, gate for the MLP, in that order."),
              (lambda **kw: _block(**kw, order=(0, 1, 2, 0, 1, 2)), "The MLP has its own shift, scale and gate "
               "(chunks 4 to 6), not the attention's.")),
    refused=ATTENTION_LIBRARIES, rule=ATTENTION_RULE, rtol=1e-6, atol=1e-8))
LIBRARY_EQUIVALENTS.update({
    "adaln": ("course_lib.nets.dit.modulate", "course_lib.nets.dit.DiTBlock"),
    "patchify": ("course_lib.nets.dit.patchify",),
    "unpatchify": ("course_lib.nets.dit.unpatchify",),
    "dit_block": ("course_lib.nets.dit.DiTBlock", "course_lib.nets.DiTBlock"),
})
