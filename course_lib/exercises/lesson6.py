"""Lesson 6: the classifier-free guided denoiser, the classifier-guided score, and a guided sampling loop (on behaviour)."""
from __future__ import annotations

import math

import torch

from ..grading import tasks as _T
from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register
from .common import SAMPLER_LIBRARIES, SAMPLER_RULE, _batch

# Calibrated on 100 random tasks each (python -m course_lib bench exercises): honest loops (Euler, DPM-Solver++(2M),
# Euler ancestral) at 30-40 steps against the mistakes and shortcuts.
ACC1_TOLERANCE = 0.15  # at scale 1 the share of samples nearest their requested mode, against what exact samples of
# p(x | y) give (the task's own number): honest loops are -0.04 to +0.10 off (ancestral steps contract the most)
OFFSET_MAX = 0.5  # at scale 1, the RMS over labels of a label's mean distance from its mode, in std: honest 0.04-0.20;
# twice the guidance (the (1 + w) convention) 0.81-1.01
SPREAD_BAND = (0.75, 1.25)  # at scale 1, the samples' RMS distance to their requested mode over the data's: honest
# 0.84-1.04; samples snapped to their label's mean 0.04-0.13
GUIDED_GAIN = 0.6  # at scale 3-5 the share must close this fraction of the gap from the loop's own share at scale 1 to
# 1: honest loops close 0.985-1.000 of it; the conditional model alone (no guidance) -0.34 to 0.28

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


def _accuracy(x, labels, mixture) -> float:
    from .. import metrics

    return float((metrics.nearest_mode(x, mixture)[0] == labels).float().mean())


def _spread(x, labels, mixture) -> tuple[float, float]:
    """(RMS distance of samples to their requested mode, over the data's sqrt(2) std; RMS over labels of the distance
    of a label's mean from its mode, in std)."""
    modes = mixture.modes.double()[labels]
    rms = float((x.double() - modes).pow(2).sum(1).mean().sqrt()) / (2**0.5 * mixture.std)
    offsets = torch.tensor([float((x[labels == c].double().mean(0) - mixture.modes[c].double()).norm())
                            for c in labels.unique().tolist()]) / mixture.std
    return rms, float(offsets.pow(2).mean().sqrt())


def assess_guided_sample_loop(task, outputs: list) -> CheckResult | None:
    """At scale 1 the samples follow p(x | y): as many nearest their requested mode (by the exact Bayes classifier of
    the mixture) as exact samples give, within ACC1_TOLERANCE; each label's samples centred on its mode (OFFSET_MAX)
    and spread as the data are (SPREAD_BAND). At the task's scale (3 to 5) the share closes GUIDED_GAIN of the gap
    from the loop's own share at scale 1 to 1."""
    from .on_behaviour import _points_or_verdict

    name, p = "guided_sample_loop", task.private
    mixture, labels, expected = p["mixture"], p["labels"], p["expected_accuracy"]
    for x in outputs:
        verdict = _points_or_verdict(name, x)
        if verdict:
            return verdict
    acc1, acc = _accuracy(outputs[0], labels, mixture), _accuracy(outputs[1], labels, mixture)
    rms, offset = _spread(outputs[0], labels, mixture)
    too_guided = ("Combine as D_u + scale (D_c - D_u), so that scale 1 is D_c exactly; with D_c + scale (D_c - D_u), "
                  "the (1 + w) convention of Ho & Salimans' paper, scale 1 already guides.")
    if abs(acc1 - expected) > ACC1_TOLERANCE:
        return CheckResult(name, FAILED, f"at scale 1 (the conditional model, no guidance) {acc1:.1%} of your samples "
                           f"are nearest to the mode asked for; exact samples of p(x | y) give {expected:.1%} here "
                           "(the modes overlap).",
                           too_guided if acc1 > expected else "Check the sign: D_u + scale (D_c - D_u).")
    if offset > OFFSET_MAX:
        return CheckResult(name, FAILED, f"at scale 1 the mean of a label's samples lies {offset:.2f} standard "
                           f"deviations from its mode (RMS over labels; sampling p(x | y) puts it within "
                           f"{OFFSET_MAX:g}): your samples are pushed away from the other modes.", too_guided)
    if not SPREAD_BAND[0] <= rms <= SPREAD_BAND[1]:
        return CheckResult(name, FAILED, f"at scale 1 your samples sit {rms:.2f} times as far from their requested "
                           f"mode as the data do (accepted: {SPREAD_BAND[0]:g} to {SPREAD_BAND[1]:g}).",
                           "Return the points the last step lands on, not modes or averages.")
    gain = (acc - acc1) / max(1 - acc1, 1e-9)
    if gain < GUIDED_GAIN:
        return CheckResult(name, FAILED, f"at scale {p['scale']:g}, {acc:.1%} of your samples are nearest to the mode "
                           f"asked for, against {acc1:.1%} at scale 1: guidance should close most of the gap to 100% "
                           f"(at least {GUIDED_GAIN:.0%} of it).",
                           "Call denoise(x, sigma, y) and denoise(x, sigma) at every step and step with "
                           "D_u + scale (D_c - D_u), not with D_c alone.")
    return None


def _no_call(denoise, x, sigmas, y, scale):
    """A shortcut: never calls the denoiser."""
    return x / sigmas[0]


def _course_data(denoise, x, sigmas, y, scale):
    """A shortcut: the lesson's own six overlapping modes, sampled at the labels asked for."""
    from ..data import ring_of_gaussians

    mix = ring_of_gaussians(6, 1.0, 0.4)
    return mix.modes[y % 6] + 0.4 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))


def _snapped(denoise, x, sigmas, y, scale):
    """A shortcut: samples with guidance, then returns each label's mean point (the modes, found by the sampler)."""
    x = ref_guided_sample_loop(denoise, x, sigmas, y, scale)
    return torch.stack([x[y == c].mean(0) for c in range(int(y.max()) + 1)])[y]


def _one_shot(denoise, x, sigmas, y, scale):
    """A shortcut: one conditional call at the largest noise level."""
    return denoise(x, float(sigmas[0]), y)


def _three_calls(denoise, x, sigmas, y, scale):
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = ref_cfg_denoiser(denoise(x, s, y), denoise(x, s), scale)
        denoise(x, s, y)
        x = d if s_next == 0 else x + (s_next - s) * (x - d) / s
    return x


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
    "guided_sample_loop", 6, ref_guided_sample_loop, None,
    "At each pair (sigma, sigma_next): d_c = denoise(x, sigma, y), d_u = denoise(x, sigma), d = d_u + scale (d_c - "
    "d_u), then an Euler step x + (sigma_next - sigma) (x - d) / sigma; the last step (to sigma = 0) lands on d.",
    mistakes=((_loop_with(lambda c, u, w: c), "not with D_c alone"),
              (_loop_with(lambda c, u, w: c + w * (c - u)), "(1 + w) convention")),
    shortcuts=((_no_call, "at scale 1"), (_course_data, "at scale 1"), (_snapped, "at scale 1"),
               (_one_shot, "at scale 1"), (_three_calls, "more than the budget")),
    trials=2, task=_T.guidance_task, assess=assess_guided_sample_loop, evidence=_T.off_schedule, seconds=60.0,
    refused=SAMPLER_LIBRARIES + ("course_lib.guidance",), rule=SAMPLER_RULE.replace("samplers)", "samplers and guidance)"),
    passed_message="on two fresh mixtures of overlapping modes your loop samples the conditional model at scale 1 (as "
                   "many samples nearest their requested mode as exact samples of p(x | y), spread as the data are) "
                   "and guides it at a scale from 3 to 5."))
LIBRARY_EQUIVALENTS.update({
    "cfg_denoiser": ("course_lib.guidance.classifier_free",),
    "classifier_guided_score": ("course_lib.guidance.classifier_guidance", "course_lib.guidance.classifier_log_prob"),
    "guided_sample_loop": ("course_lib.guidance.classifier_free", "course_lib.samplers.sample",
                           "course_lib.samplers.sample_euler", "course_lib.samplers.sample_ddim",
                           "course_lib.samplers.sample_dpmpp_2m", "course_lib.samplers.sample_heun"),
})
