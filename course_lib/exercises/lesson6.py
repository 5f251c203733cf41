"""Lesson 6: the classifier-free guided denoiser, the classifier-guided score, a guided sampling loop and RePaint's
inpainting loop (both on behaviour)."""
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


# ---- RePaint (Lugmayr et al. 2022) on a Gaussian whose conditional is known ---------------------------------------
# Calibrated with `python -m course_lib bench exercises` (data/bench_exercises.json: 40 random tasks for the reference,
# 20 for each honest variant, 10 for each mistake; 40-50 Karras levels, 10-15 passes per level):
INPAINT_BIAS = 0.25  # the length of the completions' mean error, whitened by the true conditional covariance (in
# conditional standard deviations): the reference 0.058 at most (2,000 rows: the sampling error alone is about 0.04)
INPAINT_BAND = (0.65, 1.35)  # the eigenvalues of the completions' covariance about the true conditional means,
# whitened by the true conditional covariance (1 for exact conditional samples): the reference 0.77-0.96 (its steps
# draw around the denoiser's mean, which loses a little variance); DDIM steps instead of posterior draws 0.91-1.10;
# no resampling (replacement) 2.60 at least; noising back up by sigma instead of sqrt(sigma^2 - sigma_next^2) 1.75+
KNOWN_NOISE = (0.5, 1.6)  # the known coordinates the denoiser sees lie this many noise levels from the known values
# (median over calls at levels of 0.1 and above): 1.0 when they are noised to the level; 0 when pasted in clean


def ref_repaint(denoise, known, mask, sigmas, resample):
    """RePaint (Lugmayr et al. 2022, alg. 1) in the sigma view x = x0 + sigma eps: at each level put the known part in,
    noised to the level; take a DDPM posterior step down (Ho et al. 2020, eq. 7); between passes noise back up."""
    sig = [float(s) for s in sigmas]
    x = sig[0] * torch.randn_like(known)
    for s, s_next in zip(sig[:-1], sig[1:]):
        passes = resample if s_next > 0 else 1
        for r in range(passes):
            x = torch.where(mask, known + s * torch.randn_like(known), x)
            d = denoise(x, s)
            if s_next == 0:
                x = d
                break
            ratio = (s_next / s) ** 2
            x = d + ratio * (x - d) + s_next * math.sqrt(1 - ratio) * torch.randn_like(x)
            if r < passes - 1:
                x = x + math.sqrt(s * s - s_next * s_next) * torch.randn_like(x)
    return torch.where(mask, known, x)


def _repaint_with(mistake: str):
    """The reference with one usual mistake."""
    def loop(denoise, known, mask, sigmas, resample):
        sig = [float(s) for s in sigmas]
        x = sig[0] * torch.randn_like(known)
        for s, s_next in zip(sig[:-1], sig[1:]):
            passes = 1 if mistake == "no resampling" or s_next == 0 else resample
            for r in range(passes):
                noisy = known if mistake == "clean known" else known + s * torch.randn_like(known)
                x = torch.where(mask, noisy, x)
                d = denoise(x, s)
                if s_next == 0:
                    x = d
                    break
                ratio = (s_next / s) ** 2
                x = d + ratio * (x - d) + s_next * math.sqrt(1 - ratio) * torch.randn_like(x)
                if r < passes - 1:
                    up = s if mistake == "noise up by s" else math.sqrt(s * s - s_next * s_next)
                    x = x + up * torch.randn_like(x)
        return x if mistake == "known not kept" else torch.where(mask, known, x)
    return loop


def repaint_measure(task, outputs: list) -> tuple[CheckResult | None, dict]:
    """(a verdict when the output is unusable, else None; what the judge measures): `known_gap`, the median over the
    denoiser's calls at levels of 0.1 and above of the known coordinates' RMS distance from the known values in noise
    levels; `bias`, the length of the completions' mean error whitened by the true conditional covariance; `lo` and
    `hi`, the extreme eigenvalues of the whitened completions' covariance about the true conditional means."""
    name, p = "repaint", task.private
    x, known, values = outputs[0], p["known"], p["values"]
    want = tuple(values.shape)
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
        return CheckResult(name, FAILED, f"expected the completed rows, shape {want}, got "
                           f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.",
                           "Return x after the last step, with the known coordinates put back."), {}
    if not torch.isfinite(x).all():
        return CheckResult(name, FAILED, "the completions contain NaN or infinity.",
                           "Divide by sigma only while sigma > 0: the last step goes to sigma = 0."), {}
    x = x.double()
    oracle = task.calls[0].oracles["denoise"]
    gaps = [g for s, g in oracle.log if s >= 0.1]
    cond_mean, cond_cov = p["truth"]
    w = torch.linalg.solve_triangular(torch.linalg.cholesky(cond_cov), (x[:, ~known] - cond_mean).T, upper=False).T
    eig = torch.linalg.eigvalsh(torch.cov(w.T).reshape(w.shape[1], w.shape[1]))
    return None, {"known_kept": bool(torch.allclose(x[:, known], values[:, known].double(), atol=1e-5)),
                  "known_gap": float(torch.tensor(gaps).median()) if gaps else 1.0, "bias": float(w.mean(0).norm()),
                  "lo": float(eig.min()), "hi": float(eig.max()), "calls": len(oracle.log)}


def assess_repaint(task, outputs: list) -> CheckResult | None:
    """The completions keep the known coordinates; the denoiser saw the known coordinates noised to its level
    (KNOWN_NOISE); and, whitened by the true conditional covariance about each row's true conditional mean, the
    completions' mean is within INPAINT_BIAS of 0 and their covariance's eigenvalues within INPAINT_BAND."""
    verdict, m = repaint_measure(task, outputs)
    if verdict:
        return verdict
    name, p = "repaint", task.private
    if not m["known_kept"]:
        return CheckResult(name, FAILED, "the completions do not keep the known coordinates.",
                           "End with torch.where(mask, known, x): where mask is True the answer is the known value.")
    if not KNOWN_NOISE[0] <= m["known_gap"] <= KNOWN_NOISE[1]:
        return CheckResult(name, FAILED, f"the known coordinates your loop hands the denoiser lie {m['known_gap']:.2f} "
                           "noise levels from the known values (median over its calls); at level sigma they must be "
                           "noised to it (1.0).", "Before each call put in known + sigma * noise where mask is True, "
                           "with fresh noise: the denoiser expects every coordinate at the same noise level.")
    full = task.calls[0].oracles["denoise"].budget
    if m["hi"] > INPAINT_BAND[1]:
        if m["calls"] < full / 2:
            hint = (f"Walk every level `resample` times ({p['resample']} here): after each pass but the last, noise back "
                    "up from sigma_next to sigma and step down again; that is how the generated part comes to agree "
                    f"with the known part (your loop called the denoiser {m['calls']} times of {full:.0f}).")
        elif m["lo"] > 1.3:
            hint = ("Going back up from sigma_next to sigma adds noise of variance sigma^2 - sigma_next^2 (the noise "
                    "already there has variance sigma_next^2), not sigma^2.")
        else:
            hint = ("Step down with a draw of the DDPM posterior, d + (s_next / s)^2 (x - d) + s_next sqrt(1 - "
                    "(s_next / s)^2) z with fresh noise z, and noise back up by sqrt(s^2 - s_next^2) z between passes.")
        return CheckResult(name, FAILED, f"along one direction your completions vary {m['hi']:.2f} times as much as "
                           f"samples of the true conditional distribution do (accepted: up to {INPAINT_BAND[1]:g}).", hint)
    if m["lo"] < INPAINT_BAND[0]:
        return CheckResult(name, FAILED, f"along one direction your completions vary only {m['lo']:.2f} times as much as "
                           f"samples of the true conditional distribution do (accepted: {INPAINT_BAND[0]:g} or more).",
                           "Return samples, not averages: draw fresh noise in every step down, and let the last step "
                           "(to sigma = 0) land on denoise(x, sigma).")
    if m["bias"] > INPAINT_BIAS:
        return CheckResult(name, FAILED, f"the mean of your completions lies {m['bias']:.2f} conditional standard "
                           f"deviations from the true conditional mean (accepted: {INPAINT_BIAS:g}).",
                           "Put the known part in at every level and step towards denoise(x, sigma).")
    return None


def _repaint_no_call(denoise, known, mask, sigmas, resample):
    """A shortcut: never calls the denoiser; fills the unknown coordinates with noise."""
    return torch.where(mask, known, torch.randn_like(known))


def _repaint_one_call(denoise, known, mask, sigmas, resample):
    """A shortcut: one call at the smallest level on the known values with zeros elsewhere."""
    return torch.where(mask, known, denoise(known, float(sigmas[-2])))


def _repaint_two_calls(denoise, known, mask, sigmas, resample):
    """Over the budget: two passes' worth of calls per pass."""
    for s in [float(v) for v in sigmas[:-1]] * (2 * resample):
        denoise(known, s)
    return known


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
register(Exercise(
    "repaint", 6, ref_repaint, None,
    "At each level s (to s_next), `resample` times: put the known part in noised to s (known + s z where mask is "
    "True), d = denoise(x, s), step down with d + (s_next / s)^2 (x - d) + s_next sqrt(1 - (s_next / s)^2) z, and, "
    "except after the last pass, noise back up: x + sqrt(s^2 - s_next^2) z. The step to 0 lands on d; return "
    "torch.where(mask, known, x).",
    mistakes=((_repaint_with("no resampling"), "Walk every level"), (_repaint_with("noise up by s"), "sigma^2 - sigma_next^2"),
              (_repaint_with("clean known"), "noised to it"), (_repaint_with("known not kept"), "keep the known")),
    shortcuts=((_repaint_no_call, "times as much"), (_repaint_one_call, "times as much"),
               (_repaint_two_calls, "more than the budget")),
    trials=1, task=_T.inpainting_task, assess=assess_repaint, seconds=60.0,
    refused=SAMPLER_LIBRARIES + ("course_lib.editing",),
    rule=SAMPLER_RULE.replace("samplers)", "samplers and its editing tools)"),
    passed_message="on a fresh Gaussian whose conditional distribution is known, your completions have its mean and "
                   "its spread in every direction, and the denoiser saw the known part noised to each level."))
LIBRARY_EQUIVALENTS.update({
    "repaint": ("course_lib.editing.inpaint", "course_lib.editing.repaint_path", "course_lib.samplers.ancestral_step",
                "course_lib.samplers.sample_ancestral"),
    "cfg_denoiser": ("course_lib.guidance.classifier_free",),
    "classifier_guided_score": ("course_lib.guidance.classifier_guidance", "course_lib.guidance.classifier_log_prob"),
    "guided_sample_loop": ("course_lib.guidance.classifier_free", "course_lib.samplers.sample",
                           "course_lib.samplers.sample_euler", "course_lib.samplers.sample_ddim",
                           "course_lib.samplers.sample_dpmpp_2m", "course_lib.samplers.sample_heun"),
})
