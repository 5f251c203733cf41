"""Lesson 13: a LoRA linear layer's output (graded on values against peft's own layer), DreamBooth's
prior-preservation loss for one batch (graded on values, on a fixed toy text denoiser), one step of textual inversion
(graded on values, on a toy loss of the token table) and ControlNet's join of one skip connection (graded on values);
DDIM inversion, graded on behaviour, is in lesson13_inversion.py (registered after these)."""
from __future__ import annotations

import math

import torch

from ..grading import tasks as _T
from ..grading.toys import ToyTextDenoiser, ToyWordLoss
from . import LIBRARY_EQUIVALENTS, Exercise, register

# ---- 13.1 a LoRA linear layer -------------------------------------------------------------------------------------


def ref_lora_linear(x, weight, bias, lora_A, lora_B, alpha):
    """Hu et al. 2022, eq. 3, as peft computes it: the output of a peft LoRA layer (lora.Linear, no dropout) whose base
    layer has `weight` (out, in) and `bias`, with adapter matrices A (r, in), B (out, r) and lora_alpha `alpha`:
    x W^T + b + (alpha / r) (x A^T) B^T."""
    from peft import LoraConfig, inject_adapter_in_model

    rank, (n_out, n_in) = lora_A.shape[0], weight.shape
    net = torch.nn.Sequential(torch.nn.Linear(n_in, n_out))
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=float(alpha), target_modules=["0"], lora_dropout=0.0), net)
    layer = net[0].to(x.dtype)
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.base_layer.bias.copy_(bias)
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
        return layer(x)


def _inputs_lora(gen):
    """x of shape (B, in) or (B, tokens, in); rank 2, 4 or 8; alpha a number between 1 and 32 that is not the rank
    (so that alpha, alpha / r, r / alpha and alpha / sqrt(r) all differ); B not zero (a trained adapter's)."""
    b, n_in, n_out = _T._randint(gen, 2, 6), _T._randint(gen, 5, 12), _T._randint(gen, 3, 10)
    rank = (2, 4, 8)[_T._randint(gen, 0, 2)]
    alpha = round(_T._uniform(gen, 1.0, 32.0), 2)
    alpha = alpha + 0.5 if abs(alpha - rank) < 0.25 else alpha
    shape = (b, n_in) if float(torch.rand(1, generator=gen)) < 0.5 else (b, _T._randint(gen, 2, 5), n_in)

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)
    return {"x": randn(*shape), "weight": randn(n_out, n_in) / math.sqrt(n_in), "bias": randn(n_out),
            "lora_A": randn(rank, n_in) / math.sqrt(n_in), "lora_B": randn(n_out, rank), "alpha": alpha}


def _lora_with(mistake: str):
    def fn(x, weight, bias, lora_A, lora_B, alpha):
        r = lora_A.shape[0]
        scale = {"alpha": alpha, "r over alpha": r / alpha, "rslora": alpha / math.sqrt(r)}.get(mistake, alpha / r)
        base = 0 if mistake == "no base" else x @ weight.T + (0 if mistake == "no bias" else bias)
        return base + scale * (x @ lora_A.T) @ lora_B.T
    return fn


register(Exercise(
    "lora_linear", 13, ref_lora_linear, _inputs_lora,
    "The frozen layer's output x @ weight.T + bias, plus the low-rank update scaled by alpha / r (r = lora_A.shape[0]): "
    "(alpha / r) * (x @ lora_A.T) @ lora_B.T.",
    mistakes=((_lora_with("alpha"), "Scale the update by alpha / r, not alpha: r is the rank, lora_A.shape[0]. "
               "Dividing by r is what lets you change the rank without retuning the learning rate."),
              (_lora_with("r over alpha"), "The scale is alpha / r (alpha on top)."),
              (_lora_with("rslora"), "alpha / sqrt(r) is rank-stabilised LoRA's scale (peft's use_rslora=True); "
               "peft's default, and this exercise, use alpha / r."),
              (_lora_with("no base"), "LoRA adds to the frozen layer: return x @ weight.T + bias plus the update, "
               "not the update alone."),
              (_lora_with("no bias"), "Keep the frozen layer's bias: x @ weight.T + bias.")),
    refused=("course_lib.lora", "peft"),
    rule="Write the layer yourself: course_lib.lora and peft, which compute it, are not allowed in this exercise."))


# ---- 13.2 DreamBooth's prior-preservation loss --------------------------------------------------------------------


def ref_prior_preservation_loss(model, x, context, x_prior, context_prior, sigma, noise, sigma_prior, noise_prior,
                                prior_weight):
    """Ruiz et al. 2023, eq. 2, in the sigma view with an x0-predicting model(x_noisy, sigma, context) (sigma one per
    row): the mean squared error of model(x + sigma noise, sigma, context) against x over the concept batch, plus
    prior_weight times the same over the prior batch (the frozen model's own images of its old prompts, each with its
    own caption, noise level and noise)."""
    def rows(v, like):
        return v.reshape(-1, *([1] * (like.ndim - 1)))

    concept = ((model(x + rows(sigma, x) * noise, sigma, context) - x) ** 2).mean()
    prior = ((model(x_prior + rows(sigma_prior, x_prior) * noise_prior, sigma_prior, context_prior) - x_prior) ** 2)
    return concept + prior_weight * prior.mean()


def _inputs_prior(gen):
    """A concept batch and a prior batch of different sizes (so that no mistake can mix the two up silently), one
    caption row per sample, levels from 0.05 to 10, prior_weight between 0.3 and 2 (never 1)."""
    b, bp, dim = _T._randint(gen, 3, 6), _T._randint(gen, 7, 10), _T._randint(gen, 2, 6)
    weight = round(_T._uniform(gen, 0.3, 2.0), 3)
    weight = weight + 0.2 if abs(weight - 1) < 0.1 else weight

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    def levels(n):
        return torch.exp(torch.rand(n, generator=gen, dtype=torch.float64) * math.log(200) + math.log(0.05))
    return {"model": ToyTextDenoiser(_T._uniform(gen, 0.5, 1.5)), "x": randn(b, dim), "context": randn(b, dim),
            "x_prior": randn(bp, dim), "context_prior": randn(bp, dim), "sigma": levels(b), "noise": randn(b, dim),
            "sigma_prior": levels(bp), "noise_prior": randn(bp, dim), "prior_weight": weight}


def _prior_with(mistake: str):
    def fn(model, x, context, x_prior, context_prior, sigma, noise, sigma_prior, noise_prior, prior_weight):
        def err(x0, c, s, n):
            pred = model(x0 + s[:, None] * n, s, c)
            return ((pred - (x0 + s[:, None] * n if mistake == "noisy target" else x0)) ** 2).mean()

        concept = err(x, context, sigma, noise)
        if mistake == "no prior":
            return concept
        prior = err(x_prior, context if mistake == "concept caption" else context_prior, sigma_prior, noise_prior)
        if mistake == "weight on concept":
            return prior_weight * concept + prior
        if mistake == "unweighted":
            return concept + prior
        if mistake == "averaged":
            return (concept + prior_weight * prior) / (1 + prior_weight)
        return concept + prior_weight * prior
    return fn


def _prior_pooled(model, x, context, x_prior, context_prior, sigma, noise, sigma_prior, noise_prior, prior_weight):
    """A mistake: one mean over the two batches stacked (the prior term weighted by its share of the rows)."""
    xs, cs = torch.cat([x, x_prior]), torch.cat([context, context_prior])
    ss, ns = torch.cat([sigma, sigma_prior]), torch.cat([noise, noise_prior])
    return ((model(xs + ss[:, None] * ns, ss, cs) - xs) ** 2).mean()


register(Exercise(
    "prior_preservation_loss", 13, ref_prior_preservation_loss, _inputs_prior,
    "loss(x0, c, s, n) = mean((model(x0 + s n, s, c) - x0)^2) with s one per row (s[:, None]); return "
    "loss(x, context, sigma, noise) + prior_weight * loss(x_prior, context_prior, sigma_prior, noise_prior).",
    mistakes=((_prior_with("no prior"), "Add the prior term: the same loss on the prior batch, times prior_weight. "
               "It is what keeps the model able to draw its old prompts."),
              (_prior_with("concept caption"), "Each prior image is denoised under its OWN caption (context_prior), "
               "the prompt the frozen model drew it from, not under the new concept's."),
              (_prior_with("weight on concept"), "prior_weight multiplies the prior term; the concept's term has "
               "weight 1."),
              (_prior_with("unweighted"), "Multiply the prior term by prior_weight (DreamBooth's lambda)."),
              (_prior_with("averaged"), "Return the weighted SUM, concept + prior_weight * prior, not its average."),
              (_prior_with("noisy target"), "The model predicts the clean x0: compare its output with x (and "
               "x_prior), not with the noisy input."),
              (_prior_pooled, "Average each batch on its own and add the two means (the prior's times prior_weight): "
               "one mean over both batches weights them by their sizes.")),
    refused=("course_lib.adapt", "course_lib.losses"),
    rule="Write the loss yourself: course_lib.adapt and course_lib.losses are not allowed in this exercise."))


# ---- 13.3 textual inversion: one step on one row ------------------------------------------------------------------


def ref_textual_inversion_step(table, token_id, loss, lr):
    """Gal et al. 2023, eq. 2, one gradient step: the gradient of loss(table) (the frozen model's denoising loss on
    captions using the new word) with respect to the token table, and a step of size lr on the new word's row
    `token_id` only; every other row (the words the model already knows) is returned unchanged. A new tensor."""
    t = table.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(t), t)
    out = table.detach().clone()
    out[token_id] = out[token_id] - lr * grad[token_id]
    return out


def _inputs_ti(gen):
    """A table of 6-12 words of width 3-8 (float64), a new word among them, captions of 2-4 tokens that use the new
    word and others (so every used row gets a gradient: a step on every row differs), lr between 0.05 and 0.5."""
    n, dim = _T._randint(gen, 6, 12), _T._randint(gen, 3, 8)
    token = _T._randint(gen, 0, n - 1)
    rows, length = _T._randint(gen, 2, 4), _T._randint(gen, 2, 4)
    ids = torch.randint(0, n, (rows, length), generator=gen)
    ids[:, 0] = token
    ids[0, 1] = (token + 1) % n  # at least one other word is used

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)
    return {"table": randn(n, dim), "token_id": token,
            "loss": ToyWordLoss(ids, randn(dim, dim) / math.sqrt(dim), randn(dim) * 0.5),
            "lr": round(_T._uniform(gen, 0.05, 0.5), 3)}


def _ti_with(mistake: str):
    def fn(table, token_id, loss, lr):
        t = table.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(t), t)
        out = table.detach().clone()
        if mistake == "every row":
            return out - lr * grad
        step = {"ascent": -lr, "no lr": 1.0}.get(mistake, lr)
        out[token_id] = out[token_id] - step * grad[token_id]
        return out
    return fn


register(Exercise(
    "textual_inversion_step", 13, ref_textual_inversion_step, _inputs_ti,
    "Make a copy of the table that requires grad, take the gradient of loss(copy) with respect to it "
    "(loss(copy).backward(), or torch.autograd.grad), and return a new table equal to `table` except row token_id, "
    "which becomes table[token_id] - lr * grad[token_id].",
    mistakes=((_ti_with("every row"), "Only the new word's row learns: every other row is a word the model already "
               "knows, and it must come back unchanged (step row token_id only)."),
              (_ti_with("ascent"), "Step AGAINST the gradient (minus lr times it): the loss should go down."),
              (_ti_with("no lr"), "Scale the step by lr.")),
    refused=("course_lib.adapt",),
    rule="Write the step yourself: course_lib.adapt, which trains the word, is not allowed in this exercise."))


# ---- 13.4 ControlNet's join ----------------------------------------------------------------------------------------


def ref_control_join(skip, feature, weight, bias, strength):
    """Zhang et al. 2023, eq. 4, at one skip connection: the frozen UNet's skip h plus strength times the zero conv
    (a 1x1 convolution, `weight` (C, C, 1, 1) and `bias` (C,) as nn.Conv2d stores them) of the trainable copy's
    feature f at the same place: h + strength (W f + b), W applied over the channels at every pixel."""
    import torch.nn.functional as F

    return skip + strength * F.conv2d(feature, weight, bias)


def _inputs_join(gen):
    """A batch of 1-3, 2-6 channels, 2-5 by 2-5 pixels; a trained zero conv (non-zero, not symmetric) and a strength
    between 0.3 and 2 that is not 1 (so that a misplaced or forgotten strength differs)."""
    b, c = _T._randint(gen, 1, 3), _T._randint(gen, 2, 6)
    h, w = _T._randint(gen, 2, 5), _T._randint(gen, 2, 5)
    strength = round(_T._uniform(gen, 0.3, 2.0), 3)
    strength = strength + 0.25 if abs(strength - 1) < 0.1 else strength

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)
    return {"skip": randn(b, c, h, w), "feature": randn(b, c, h, w), "weight": randn(c, c, 1, 1) / math.sqrt(c),
            "bias": randn(c), "strength": strength}


def _join_with(mistake: str):
    def fn(skip, feature, weight, bias, strength):
        w = weight[:, :, 0, 0]
        w = w.T if mistake == "transposed" else w
        source = skip if mistake == "conv on skip" else feature
        z = torch.einsum("oc,bchw->bohw", w, source) + (0 if mistake == "no bias" else bias[None, :, None, None])
        if mistake == "no conv":
            z = feature
        if mistake == "replace":
            return strength * z
        if mistake == "strength on both":
            return strength * (skip + z)
        return skip + (1 if mistake == "no strength" else strength) * z
    return fn


register(Exercise(
    "control_join", 13, ref_control_join, _inputs_join,
    "The zero conv is a 1x1 convolution over the copy's feature: z[b, o] = sum over c of weight[o, c, 0, 0] * "
    "feature[b, c] + bias[o] at every pixel (torch.nn.functional.conv2d(feature, weight, bias)); return skip + "
    "strength * z.",
    mistakes=((_join_with("transposed"), "weight[o, c] maps input channel c to output channel o: sum over the SECOND "
               "index (nn.Conv2d's layout is (out, in, 1, 1)), not the first."),
              (_join_with("conv on skip"), "The zero conv reads the trainable copy's feature, not the frozen skip: "
               "skip + strength * conv(feature)."),
              (_join_with("no bias"), "The zero conv has a bias too (zero at the start, trained after): add bias[o] "
               "to every pixel of channel o."),
              (_join_with("no conv"), "The copy's feature goes through the zero conv before it is added: that layer "
               "is what starts at zero and keeps a fresh ControlNet from changing the model."),
              (_join_with("replace"), "ControlNet ADDS to the frozen model's skip connection: return skip + "
               "strength * conv(feature), not the control alone."),
              (_join_with("strength on both"), "strength scales only the control, not the frozen skip: strength 0 "
               "must give the plain model back."),
              (_join_with("no strength"), "Multiply the control by strength (ControlNet's conditioning scale).")),
    refused=("course_lib.controlnet",),
    rule="Write the join yourself: course_lib.controlnet, which computes it, is not allowed in this exercise."))


LIBRARY_EQUIVALENTS.update({
    "lora_linear": ("course_lib.lora.lora_linear",),
    "prior_preservation_loss": ("course_lib.adapt.adapt", "course_lib.losses.diffusion_loss"),
    "control_join": ("course_lib.controlnet.ControlNet", "course_lib.controlnet.Controlled"),
    "textual_inversion_step": ("course_lib.adapt.adapt",),
})
