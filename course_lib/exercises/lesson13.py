"""Lesson 13: a LoRA linear layer's output (graded on values against peft's own layer), DreamBooth's
prior-preservation loss for one batch (graded on values, on a fixed toy text denoiser), ControlNet's join of one skip
connection (graded on values), and DDIM inversion (graded on behaviour: the judge samples the noise the learner's
inversion returns back down with its own DDIM loop on the exact denoiser of a fresh Gaussian mixture, and compares the
result with the points the learner inverted)."""
from __future__ import annotations

import math

import torch

from ..grading import tasks as _T
from ..grading.oracles import Oracle, OracleRef, as_float, as_points
from ..grading.toys import ToyTextDenoiser
from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register

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


# ---- 13.3 ControlNet's join ----------------------------------------------------------------------------------------


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


# ---- 13.4 DDIM inversion, graded on behaviour ---------------------------------------------------------------------

# Calibrated by `python -m course_lib bench exercises --only ddim_invert` (data/bench_exercises.json; one thread,
# 0.2 s a check): the reference 100/100 (RMS reconstruction error 0.15-0.34 mixture std, the noise's std 0.90-1.0 of
# sigmas[0]), two honest styles 50/50 each; the estimate d returned: 2.6-3.4 std; noise added or the division by s
# forgotten: 3.5 std and more; the denoiser at the level it goes to, or the levels walked down, caught by the calls'
# levels; every mistake 0 passed with its own hint, every shortcut 0/15
RECONSTRUCTION_SLACK = 1.5  # accepted: RMS error <= this times the judge's own inversion's, plus ...
RECONSTRUCTION_FLOOR = 0.05  # ... this many mixture std (float32 rounding at the top levels)


def ref_ddim_invert(denoise, x0, sigmas):
    """Song et al. 2021 (sec. 4.3) run upwards: x0 is the state at the smallest positive level sigmas[-2]; for each
    level s, in ascending order, up to the next one s': d = denoise(x, s), x = d + (s' / s) (x - d). Returns the state
    at sigmas[0]: the noise DDIM on `sigmas` maps back to about x0. One denoiser call per step up."""
    up = [float(s) for s in sigmas if float(s) > 0][::-1]
    x = x0
    for s, s_next in zip(up[:-1], up[1:]):
        d = denoise(x, s)
        x = d + (s_next / s) * (x - d)
    return x


def ddim_down(denoise, x, sigmas):
    """The judge's DDIM sampling loop (the sigma view) from x at sigmas[0] down to sigmas[-1] = 0."""
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = denoise(x, s)
        x = d if s_next == 0 else d + (s_next / s) * (x - d)
    return x


def inversion_task(gen: torch.Generator) -> _T.Task:
    """ddim_invert(denoise, x0, sigmas) on the exact denoiser of a fresh overlapping mixture (std 0.3-0.4), x0 1,000 of
    its samples, 30-50 Karras levels from 0.01-0.05 to 10-30 ending at 0; one denoiser call per step up."""
    from ..analytic import mixture_denoiser
    from ..step_schedules import karras_sigmas

    mix = _T.overlapping_mixture(gen)
    n = _T._randint(gen, 30, 50)
    sigmas = karras_sigmas(n, round(_T._uniform(gen, 0.01, 0.05), 4), round(_T._uniform(gen, 10, 30), 3), 7.0).float()
    x0 = mix.sample(_T.SAMPLE_POINTS, gen).float()
    exact = mixture_denoiser(mix)

    def check(x, sigma):
        x, sigma = as_points(x, _T.SAMPLE_POINTS, "x"), as_float(sigma, "sigma")
        if not sigma > 0:
            raise ValueError(f"sigma must be a positive noise level, got {sigma} (x0 is the state at sigmas[-2]; "
                             "there is nothing to denoise at 0)")
        return x, sigma
    denoise = Oracle("denoise", lambda x, sigma: exact(x, sigma).float(), check, n - 1,
                     budget_text=f"one call per step up: {n - 1} for {n} positive levels",
                     note=lambda a: {"x": a[0].float(), "sigma": a[1]})
    return _T.Task([_T.Call({"denoise": OracleRef("denoise"), "x0": x0, "sigmas": sigmas}, {"denoise": denoise})],
                   {"mixture": mix, "sigmas": sigmas, "x0": x0})


def _fail(message: str, hint: str) -> CheckResult:
    return CheckResult("ddim_invert", FAILED, message, hint)


def inversion_measure(task, outputs: list) -> tuple[CheckResult | None, dict]:
    """(the verdict, None when right; what the judge measured): the denoiser called once at each positive level but the
    top, in ascending order, first at x0; the judge's DDIM loop from what was returned lands within
    RECONSTRUCTION_SLACK times the error of its own inversion (plus RECONSTRUCTION_FLOOR mixture std) of x0."""
    from ..analytic import mixture_denoiser

    p = task.private
    z, sigmas, x0, mix = outputs[0], p["sigmas"], p["x0"], p["mixture"]
    want = (_T.SAMPLE_POINTS, 2)
    if not isinstance(z, torch.Tensor) or tuple(z.shape) != want:
        return _fail(f"expected the noise, shape {want}, got {tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}.",
                     "Return the state at the top level, sigmas[0]: the same shape as x0."), {}
    if not z.is_floating_point() or not torch.isfinite(z).all():
        return _fail("the noise you returned holds NaN or infinity.", "Each step up is x = d + (s' / s) (x - d) with "
                     "d = denoise(x, s): it grows x by about s' / s, not more."), {}
    up = [float(s) for s in sigmas if float(s) > 0][::-1]
    log = task.calls[0].oracles["denoise"].log
    seen = [c["sigma"] for c in log]
    if len(seen) != len(up) - 1 or any(abs(a - b) > 1e-4 * b for a, b in zip(seen, up[:-1])):
        shown = [round(s, 3) for s in seen[:6]] + (["..."] if len(seen) > 6 else [])
        return _fail(f"denoise was called at levels {shown} ({len(seen)} calls); inversion calls it at each positive "
                     f"level from the smallest, {up[0]:.3g}, up to the one below the top, {up[-2]:.3g} ({len(up) - 1} "
                     "calls).", "Walk UP the levels (sigmas reversed, without the 0), and at each step call denoise "
                     "at the level you start from, s, not the one you go to: its value at s' is not known yet (you "
                     "are not at s')."), {"calls": len(seen)}
    if not torch.allclose(log[0]["x"], x0, rtol=1e-5, atol=1e-5):
        return _fail("the first call of denoise was not at x0.", "x0 itself is the state at the smallest level: "
                     "start there (do not add noise to it)."), {}
    exact = mixture_denoiser(mix)

    def denoise(x, s):
        return exact(x, s)
    got = ddim_down(denoise, z.double(), sigmas.double())
    own = ddim_down(denoise, ref_ddim_invert(denoise, x0.double(), sigmas.double()), sigmas.double())
    error = float(((got - x0.double()) ** 2).sum(1).mean().sqrt()) / mix.std
    reference = float(((own - x0.double()) ** 2).sum(1).mean().sqrt()) / mix.std
    limit = RECONSTRUCTION_SLACK * reference + RECONSTRUCTION_FLOOR
    measured = {"error_std": error, "reference_std": reference, "noise_std_ratio": float(z.double().std()) / up[-1]}
    if error > limit:
        return _fail(f"DDIM sampling from the noise you returned lands {error:.2f} mixture std (RMS) from the points you "
                     f"inverted; exact inversion on the same levels lands {reference:.2f} from them (accepted: "
                     f"{limit:.2f}).", "Each step up from s to s': d = denoise(x, s), then x = d + (s' / s) (x - d) "
                     "(the DDIM step run backwards); return the state x at the top, not d."), measured
    return None, measured


def assess_ddim_invert(task, outputs: list) -> CheckResult | None:
    """The verdict of inversion_measure."""
    return inversion_measure(task, outputs)[0]


def _invert_with(mistake: str):
    def fn(denoise, x0, sigmas):
        up = [float(s) for s in sigmas if float(s) > 0][::-1]
        if mistake == "downwards":
            up = up[::-1]
        x, d = x0, x0
        for s, s_next in zip(up[:-1], up[1:]):
            d = denoise(x, s_next if mistake == "next level" else s)
            x = x + (s_next - s) * (x - d) if mistake == "no division" else d + (s_next / s) * (x - d)
        return d if mistake == "estimate" else x
    return fn


def _noised(denoise, x0, sigmas):
    """A mistake that calls nothing right: x0 plus noise of the top level's size (the forward process, not the ODE)."""
    for s in [float(s) for s in sigmas if float(s) > 0][::-1][:-1]:
        denoise(x0, s)
    return x0 + float(sigmas[0]) * torch.randn_like(x0)


def _no_call(denoise, x0, sigmas):
    """A shortcut: never calls denoise; the forward process's noise at the top level."""
    return x0 + float(sigmas[0]) * torch.randn_like(x0)


def _scaled(denoise, x0, sigmas):
    """A shortcut: x0 blown up to the top level's size."""
    return x0 * float(sigmas[0]) / x0.std()


register(Exercise(
    "ddim_invert", 13, ref_ddim_invert, None,
    "up = the positive levels of sigmas, smallest first; x = x0; for each s, s' in up: d = denoise(x, s); "
    "x = d + (s' / s) * (x - d). Return x.",
    mistakes=((_invert_with("next level"), "not the one you go to"), (_invert_with("downwards"), "Walk UP"),
              (_invert_with("estimate"), "not d"), (_invert_with("no division"), "exact inversion on the same levels"),
              (_noised, "exact inversion on the same levels")),
    shortcuts=((_no_call, "levels"), (_scaled, "levels")),
    trials=3, task=inversion_task, assess=assess_ddim_invert, seconds=60.0, points=2,
    refused=("course_lib.inversion",),
    rule="Write the inversion yourself: course_lib.inversion, which computes it, is not allowed in this exercise.",
    passed_message="on fresh mixtures your inversion called the denoiser once per level on the way up, and the judge's "
                   "DDIM sampling took the noise you returned back to the points you inverted."))

LIBRARY_EQUIVALENTS.update({
    "lora_linear": ("course_lib.lora.lora_linear",),
    "prior_preservation_loss": ("course_lib.adapt.adapt", "course_lib.losses.diffusion_loss"),
    "ddim_invert": ("course_lib.inversion.ddim_invert", "course_lib.inversion.reconstruct"),
    "control_join": ("course_lib.controlnet.ControlNet", "course_lib.controlnet.Controlled"),
})
