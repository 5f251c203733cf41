"""Lesson 6: the classifier-free guided denoiser, the classifier-guided score, and a guided sampling loop (on behaviour)."""
from __future__ import annotations

import math

import torch

from ..grading import harnesses as _H
from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register
from .common import _batch

GUIDED_FLOOR = 0.97  # label accuracy at scale >= 3: the reference loop reaches 1.000; the conditional alone ~0.80
W1_BAND = (0.70, 0.95)  # at scale 1 (the conditional model): the exact p(x | y) gives ~0.78, an Euler / DDIM loop
# 0.80, an ancestral one 0.89 (the sampler's own error at 15-25 steps); twice the guidance (the (1 + w) convention) 1.0


def ref_cfg_denoiser(d_cond, d_uncond, scale):
    """D_w = D_uncond + w (D_cond - D_uncond): Ho & Salimans (2022), eq. 6, with diffusers' convention (w = 1 is
    the conditional model)."""
    return d_uncond + scale * (d_cond - d_uncond)


def _inputs_cfg(gen):
    _, shape = _batch(gen)
    return {"d_cond": torch.randn(shape, generator=gen), "d_uncond": torch.randn(shape, generator=gen),
            "scale": round(float(torch.rand(1, generator=gen)) * 7 + 0.5, 3)}


def ref_classifier_guided_score(score, x, y, weight, bias, scale):
    """score + s grad_x log p(y | x) for the linear classifier logits = x.flatten(1) @ weight.T + bias (Dhariwal &
    Nichol 2021, eq. 10-11 in score form): the gradient of log softmax's entry y, taken with autograd."""
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        logp = torch.log_softmax(xg.flatten(1) @ weight.T + bias, dim=1)
        (grad,) = torch.autograd.grad(logp.gather(1, y[:, None]).sum(), xg)
    return score + scale * grad


def _inputs_cg(gen):
    b, shape = _batch(gen)
    k, d = int(torch.randint(3, 11, (1,), generator=gen)), math.prod(shape[1:])
    return {"score": torch.randn(shape, generator=gen, dtype=torch.float64),
            "x": torch.randn(shape, generator=gen, dtype=torch.float64),
            "y": torch.randint(k, (b,), generator=gen),
            "weight": torch.randn(k, d, generator=gen, dtype=torch.float64) / math.sqrt(d),
            "bias": torch.randn(k, generator=gen, dtype=torch.float64),
            "scale": round(float(torch.rand(1, generator=gen)) * 4 + 0.5, 3)}


def _cg_logit_only(score, x, y, weight, bias, scale):
    return score + scale * weight[y].reshape(x.shape)


def _cg_prob(score, x, y, weight, bias, scale):
    p = torch.softmax(x.flatten(1) @ weight.T + bias, dim=1)
    py = p.gather(1, y[:, None])
    return score + scale * (py * (weight[y] - p @ weight)).reshape(x.shape)


def _loop_with(combine):
    """A guided Euler (= DDIM) loop that combines the conditional and unconditional predictions with `combine`."""
    def loop(denoise, x, sigmas, y, scale):
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            d = combine(denoise(x, s, y), denoise(x, s), scale)
            x = d if s_next == 0 else x + (s_next - s) * (x - d) / s
        return x
    return loop


def ref_guided_sample_loop(denoise, x, sigmas, y, scale):
    """Euler (= DDIM) steps on the classifier-free guided denoiser D_u + w (D_c - D_u), two evaluations per step."""
    return _loop_with(ref_cfg_denoiser)(denoise, x, sigmas, y, scale)


def _label_accuracy(name: str, x, labels, mixture) -> tuple[float | None, CheckResult | None]:
    from .. import metrics

    want = (_H.SAMPLE_POINTS, 2)
    if x is None or labels is None or tuple(x.shape) != want:
        return None, CheckResult(name, FAILED, f"expected the final points, shape {want}, got "
                                 f"{None if x is None else tuple(x.shape)}.", "Return x after the last step.")
    if not torch.isfinite(x).all():
        return None, CheckResult(name, FAILED, "the samples contain NaN or infinity.",
                                 "Divide by sigma only while sigma > 0: the last step goes to sigma = 0.")
    return float((metrics.nearest_mode(x, mixture)[0] == labels).float().mean()), None


def assess_guided_sample_loop(inputs: dict, outputs: dict) -> CheckResult | None:
    """The samples' label accuracy (by the exact Bayes classifier of the mixture: the nearest mode): inside W1_BAND at
    scale 1 (the conditional model itself), at least GUIDED_FLOOR at the trial's scale (3 to 5)."""
    name = "guided_sample_loop"
    mixture = _H.task_mixture(_H.GUIDE_K, inputs["angle"], std=_H.GUIDE_STD)
    acc1, verdict = _label_accuracy(name, outputs.get("samples_1"), outputs.get("labels"), mixture)
    if verdict:
        return verdict
    if not W1_BAND[0] <= acc1 <= W1_BAND[1]:
        return CheckResult(name, FAILED, f"at scale 1 (the conditional model, no guidance) {acc1:.1%} of your samples "
                           f"carry the label asked for; sampling p(x | y) gives {W1_BAND[0]:.0%} to {W1_BAND[1]:.0%} "
                           "here (the modes overlap).",
                           "Combine as D_u + scale (D_c - D_u), so that scale 1 is D_c exactly; with D_c + scale "
                           "(D_c - D_u), the (1 + w) convention of Ho & Salimans' paper, scale 1 already guides."
                           if acc1 > W1_BAND[1] else "Check the sign: D_u + scale (D_c - D_u).")
    w = inputs["scale"]
    acc, verdict = _label_accuracy(name, outputs.get("samples_w"), outputs.get("labels"), mixture)
    if verdict:
        return verdict
    if acc < GUIDED_FLOOR:
        return CheckResult(name, FAILED, f"at scale {w:g}, {acc:.1%} of your samples carry the label asked for; guided "
                           f"sampling reaches {GUIDED_FLOOR:.0%} (the conditional model alone: {acc1:.0%}).",
                           "Call denoise(x, sigma, y) and denoise(x, sigma) at every step and step with "
                           "D_u + scale (D_c - D_u), not with D_c alone.")
    return None


def _inputs_guided(gen) -> dict:
    return {"seed": int(torch.randint(0, 2**31 - 1, (1,), generator=gen)),
            "angle": round(float(torch.rand(1, generator=gen)) * 2 * math.pi, 4),
            "scale": round(3 + 2 * float(torch.rand(1, generator=gen)), 3),
            "nfe": int(torch.randint(15, 26, (1,), generator=gen)),
            "sigma_max": round(10 + 10 * float(torch.rand(1, generator=gen)), 3),
            "sigma_min": round(0.01 + 0.02 * float(torch.rand(1, generator=gen)), 4)}


register(Exercise(
    "cfg_denoiser", 6, ref_cfg_denoiser, _inputs_cfg,
    "Start from the unconditional prediction and move `scale` times the difference towards the conditional one: "
    "scale 0 is d_uncond, scale 1 is d_cond.",
    mistakes=((lambda d_cond, d_uncond, scale: d_cond + scale * (d_cond - d_uncond),
               "That is the (1 + w) convention of Ho & Salimans' paper: here scale = 1 must return d_cond exactly "
               "(diffusers' guidance_scale), so start from d_uncond."),
              (lambda d_cond, d_uncond, scale: d_cond + scale * (d_uncond - d_cond),
               "The difference points from the unconditional to the conditional prediction: d_cond - d_uncond."),
              (lambda d_cond, d_uncond, scale: d_cond,
               "Both predictions take part: d_uncond + scale (d_cond - d_uncond).")),
    rtol=1e-5, atol=1e-5))
register(Exercise(
    "classifier_guided_score", 6, ref_classifier_guided_score, _inputs_cg,
    "logits = x.flatten(1) @ weight.T + bias; take log_softmax over classes, pick entry y of each row, and add scale "
    "times its gradient with respect to x (torch.autograd.grad on x.requires_grad_()) to the score.",
    mistakes=((_cg_logit_only, "That is the gradient of the logit of y alone: log p(y | x) = logit_y - logsumexp("
               "logits), and the logsumexp term pulls away from the other classes."),
              (_cg_prob, "Guide with the gradient of log p(y | x), not of p(y | x) (it is p times smaller where the "
               "classifier is unsure)."),
              (lambda score, x, y, weight, bias, scale: score - ref_classifier_guided_score(
                  torch.zeros_like(score), x, y, weight, bias, scale),
               "Add the gradient: guidance climbs log p(y | x)."),
              (lambda score, x, y, weight, bias, scale: ref_classifier_guided_score(score, x, y, weight, bias, 1.0),
               "Multiply the gradient by scale.")),
    rtol=1e-6, atol=1e-8))
register(Exercise(
    "guided_sample_loop", 6, ref_guided_sample_loop, _inputs_guided,
    "At each pair (sigma, sigma_next): d_c = denoise(x, sigma, y), d_u = denoise(x, sigma), d = d_u + scale (d_c - "
    "d_u), then an Euler step x + (sigma_next - sigma) (x - d) / sigma; the last step (to sigma = 0) lands on d.",
    mistakes=((_loop_with(lambda c, u, w: c), "not with D_c alone"),
              (_loop_with(lambda c, u, w: c + w * (c - u)), "(1 + w) convention")),
    trials=2, harness="guided_sampling", assess=assess_guided_sample_loop, seconds=60.0,
    passed_message=f"your loop samples the conditional model at scale 1 ({W1_BAND[0]:.0%}-{W1_BAND[1]:.0%} of labels "
                   f"right, as p(x | y) of overlapping modes gives) and guides it to at least {GUIDED_FLOOR:.0%} at a "
                   f"scale from 3 to 5."))
LIBRARY_EQUIVALENTS.update({
    "cfg_denoiser": ("course_lib.guidance.classifier_free",),
    "classifier_guided_score": ("course_lib.guidance.classifier_guidance", "course_lib.guidance.classifier_log_prob"),
    "guided_sample_loop": ("course_lib.guidance.classifier_free", "course_lib.samplers.sample",
                           "course_lib.samplers.sample_euler", "course_lib.samplers.sample_ddim",
                           "course_lib.samplers.sample_dpmpp_2m", "course_lib.samplers.sample_heun"),
})
