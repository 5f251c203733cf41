"""Lesson 7: cross-attention to caption tokens, scaling the latents, and the text-guided noise prediction."""
from __future__ import annotations

import math

import torch

from ..grading import image_tasks as _I
from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register
from .common import ATTENTION_LIBRARIES, ATTENTION_RULE


def _attend(x, context, mask, w_q, w_k, w_v, heads, scale=None, use_mask=True, softmax_dim=-1):
    b, n, c = x.shape
    d = c // heads
    q = (x @ w_q.T).reshape(b, n, heads, d).transpose(1, 2)
    k = (context @ w_k.T).reshape(b, -1, heads, d).transpose(1, 2)
    v = (context @ w_v.T).reshape(b, -1, heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * (1 / math.sqrt(d) if scale is None else scale)
    if use_mask:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return (scores.softmax(softmax_dim) @ v).transpose(1, 2).reshape(b, n, c)


def ref_cross_attention(x, context, mask, w_q, w_k, w_v, heads):
    """softmax(Q K^T / sqrt(d) + masked) V per head, Q = x W_q^T, K = context W_k^T, V = context W_v^T (Vaswani et
    al. 2017, eq. 1; Rombach et al. 2022, eq. 3); d = C / heads; padded tokens (mask False) get no weight."""
    return _attend(x, context, mask, w_q, w_k, w_v, heads)


def _inputs_xattn(gen):
    b, n, heads = int(torch.randint(2, 5, (1,), generator=gen)), int(torch.randint(3, 10, (1,), generator=gen)), \
        int((2, 4)[int(torch.randint(2, (1,), generator=gen))])
    d, dc, length = int(torch.randint(2, 5, (1,), generator=gen)), int(torch.randint(3, 9, (1,), generator=gen)), \
        int(torch.randint(3, 8, (1,), generator=gen))
    c = heads * d
    mask = torch.rand(b, length, generator=gen) < 0.6
    mask[:, 0] = True  # the start token: every caption has at least one
    mask[0, -1] = False  # at least one padded token
    f = dict(generator=gen, dtype=torch.float64)
    return {"x": torch.randn(b, n, c, **f), "context": torch.randn(b, length, dc, **f), "mask": mask,
            "w_q": torch.randn(c, c, **f), "w_k": torch.randn(c, dc, **f), "w_v": torch.randn(c, dc, **f),
            "heads": heads}


def ref_scale_latents(latents):
    """The latents times the scale factor 1 / std (over every element), so that diffusion sees unit variance as its
    noise schedule assumes (Rombach et al. 2022, sec. 4.3.2 and app. G: SD's 0.18215); no mean is removed, so that
    decoding z / factor gives the autoencoder back exactly what it made."""
    return latents / latents.std()


def _inputs_scale(gen):
    n, c, s = int(torch.randint(4, 9, (1,), generator=gen)), int(torch.randint(2, 5, (1,), generator=gen)), \
        int((4, 8)[int(torch.randint(2, (1,), generator=gen))])
    per_channel = torch.rand(1, c, 1, 1, generator=gen, dtype=torch.float64) * 4 + 2
    offset = torch.randn(1, c, 1, 1, generator=gen, dtype=torch.float64)
    return {"latents": offset + per_channel * torch.randn(n, c, s, s, generator=gen, dtype=torch.float64)}


def ref_text_guided_eps(model, x, t, context, mask, null_context, null_mask, scale):
    """eps_u + w (eps_c - eps_u), eps_c = model(x, t, context, mask), eps_u the same with the empty caption's states
    repeated over the batch: both in one call on a batch of 2B (Ho & Salimans 2022, eq. 6; diffusers' convention)."""
    b = x.shape[0]
    both = model(torch.cat([x, x]), torch.cat([t, t]), context=torch.cat([context, null_context.expand(b, -1, -1)]),
                 mask=torch.cat([mask, null_mask.expand(b, -1)]))
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)


def _guided(task, combine=None) -> torch.Tensor:
    """The guided prediction on the task's inputs with the task's own network: the reference, or `combine`(eps_c, eps_u,
    w) for a known mistake."""
    model, inputs = task.private["model"], task.private["inputs"]
    if combine is None:
        return ref_text_guided_eps(model, **inputs)
    b = inputs["x"].shape[0]
    cond = model(inputs["x"], inputs["t"], context=inputs["context"], mask=inputs["mask"])
    uncond = model(inputs["x"], inputs["t"], context=inputs["null_context"].expand(b, -1, -1),
                   mask=inputs["null_mask"].expand(b, -1))
    return combine(cond, uncond, inputs["scale"])


TEXT_MISTAKES = ((lambda c, u, w: c, "That is the conditional prediction alone: guidance needs the empty caption's "
                  "prediction too, eps_u + scale (eps_c - eps_u)."),
                 (lambda c, u, w: c + w * (c - u), "That is the (1 + w) convention of the paper: here scale = 1 must "
                  "give the conditional prediction exactly, so start from eps_u."),
                 (lambda c, u, w: u + w * (u - c), "The guidance direction points from the empty caption's "
                  "prediction to the caption's: eps_c - eps_u."))


def _text_mistake(combine):
    """A learner's function that makes both predictions (two calls of B rows) and combines them with `combine`."""
    def fn(model, x, t, context, mask, null_context, null_mask, scale):
        b = x.shape[0]
        cond = model(x, t, context=context, mask=mask)
        uncond = model(x, t, context=null_context.expand(b, -1, -1), mask=null_mask.expand(b, -1))
        return combine(cond, uncond, scale)
    return fn


def assess_text_guided_eps(task, outputs: list) -> CheckResult | None:
    """The guided prediction against the reference on the same task (computed by the judge, with its own network)."""
    name, got, scale = "text_guided_eps", outputs[0], task.private["inputs"]["scale"]
    want = _guided(task)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return CheckResult(name, FAILED, f"expected a tensor of shape {tuple(want.shape)} (the batch's guided noise "
                           f"predictions), got {tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}.",
                           "Return eps_u + scale (eps_c - eps_u) for the B images, not the 2B rows of the batched call.")
    if torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-4):
        return None
    for combine, hint in TEXT_MISTAKES:
        if torch.allclose(got.double(), _guided(task, combine).double(), rtol=1e-4, atol=1e-4):
            return CheckResult(name, FAILED, f"values differ from the reference at scale {scale:g}.", hint)
    return CheckResult(name, FAILED, f"values differ from the reference at scale {scale:g} (max abs error "
                       f"{float((got.double() - want.double()).abs().max()):.3g}).",
                       "Call model(x2, t2, context=..., mask=...) on x and t repeated twice, with the captions' "
                       "states for the first half and null_context / null_mask expanded to B rows for the second; "
                       "split the output with .chunk(2) and combine.")


def _no_call(model, x, t, context, mask, null_context, null_mask, scale):
    """A shortcut: never calls the model."""
    return torch.zeros_like(x)


def _three_calls(model, x, t, context, mask, null_context, null_mask, scale):
    b = x.shape[0]
    cond = model(x, t, context=context, mask=mask)
    model(x, t, context=context, mask=mask)
    uncond = model(x, t, context=null_context.expand(b, -1, -1), mask=null_mask.expand(b, -1))
    return uncond + scale * (cond - uncond)


register(Exercise(
    "cross_attention", 7, ref_cross_attention, _inputs_xattn,
    "q = x @ w_q.T, k = context @ w_k.T, v = context @ w_v.T; split the channels into `heads` heads of d = C // heads "
    "(reshape to (B, N, heads, d) and move heads forward); scores = q @ k^T / sqrt(d); set the scores of padded "
    "tokens (mask False) to -inf; softmax over the tokens; @ v; put the heads back together to (B, N, C).",
    mistakes=((lambda **kw: _attend(**kw, use_mask=False),
               "Padded tokens must get no attention: masked_fill the scores where mask is False with -inf before the "
               "softmax."),
              (lambda **kw: _attend(**kw, scale=1 / math.sqrt(kw["x"].shape[-1])),
               "Divide by the square root of the per-head width d = C // heads, not of C."),
              (lambda **kw: _attend(**kw, scale=1.0), "Scale the scores by 1 / sqrt(d) (Vaswani et al. 2017, eq. 1)."),
              (lambda **kw: _attend(**kw, softmax_dim=-2),
               "Each query's weights over the caption tokens sum to one: softmax over the last axis (the tokens)."),
              (lambda **kw: _attend(**{**kw, "heads": 1}),
               "Split the channels into `heads` heads, each attending on its own with d = C // heads.")),
    refused=ATTENTION_LIBRARIES, rule=ATTENTION_RULE, rtol=1e-6, atol=1e-8))
register(Exercise(
    "scale_latents", 7, ref_scale_latents, _inputs_scale,
    "Divide by one number, the standard deviation over every element of the batch (latents.std()).",
    mistakes=((lambda latents: (latents - latents.mean()) / latents.std(),
               "Only scale: no mean is removed (decoding divides by the factor and must get the encoder's latents "
               "back exactly)."),
              (lambda latents: latents / latents.std(dim=(0, 2, 3), keepdim=True),
               "One factor for all channels (as SD's 0.18215), the std over every element."),
              (lambda latents: latents / latents.var(), "Divide by the standard deviation, not the variance."),
              (lambda latents: latents * latents.std(), "Divide by the standard deviation: the factor is 1 / std.")),
    rtol=2e-3, atol=1e-8))
register(Exercise(
    "text_guided_eps", 7, ref_text_guided_eps, None,
    "Repeat x and t twice, stack the captions' context and mask with the empty caption's (expanded to B rows), call "
    "the model once, split the result into (eps_c, eps_u) with .chunk(2), return eps_u + scale (eps_c - eps_u).",
    mistakes=tuple((_text_mistake(combine), hint) for combine, hint in TEXT_MISTAKES),
    shortcuts=((_no_call, "values differ"), (_three_calls, "more than the budget")),
    trials=2, task=_I.text_guidance_task, assess=assess_text_guided_eps,
    passed_message="your guided prediction matches eps_u + w (eps_c - eps_u) on a text-conditioned UNet, within "
                   "the budget of one conditional and one empty-caption prediction per image."))
LIBRARY_EQUIVALENTS.update({
    "cross_attention": ("course_lib.nets.CrossAttention", "course_lib.nets.cross_attention.CrossAttention"),
    "scale_latents": ("course_lib.autoencoder.measure",),
    "text_guided_eps": ("course_lib.text2image.caption_guidance",),
})
