"""Lesson 12: the consistency-distillation loss, a progressive-distillation target and the guided teacher step of a
latent consistency model (graded on values, on fixed toy networks), and multistep consistency sampling (graded on behaviour: with the exact consistency function of a fresh
Gaussian mixture as the oracle, the judge checks each call's level and input, the noise added between calls, and the
samples)."""
from __future__ import annotations

import math

import torch

from ..grading import tasks as _T
from ..grading.oracles import Oracle, OracleRef
from ..grading.toys import ToyDenoiser, ToyRowDenoiser, ToyRowNetwork, ToyTextDenoiser
from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register
from .on_behaviour import MODE_SHARE, _points_or_verdict, _quality

FEW_STEP_LIBRARIES = ("course_lib.consistency", "course_lib.families.fewstep", "course_lib.families.adversarial",
                      "course_lib.families.lcm")
FEW_STEP_RULE = ("Write the steps yourself: course_lib.consistency and the few-step families, which compute them, are "
                 "not allowed in this exercise.")

# ---- 12.2 the consistency-distillation loss -----------------------------------------------------------------------


def ref_consistency_distillation_loss(student, target, teacher, x0, noise, sigma, sigma_next, sigma_data, sigma_min):
    """Song et al. 2023, Algorithm 2, one batch, sigma and sigma_next one per row: x = x0 + sigma noise; one Heun step
    of the teacher's probability-flow ODE dx/dsigma = (x - teacher(x, sigma)) / sigma down to sigma_next gives x_next;
    each network F is read as the consistency function f(x, s) = c_skip(s) x + c_out(s) F(x, s) with
    c_skip = sigma_data^2 / ((s - sigma_min)^2 + sigma_data^2) and c_out = (s - sigma_min) / sqrt((s - sigma_min)^2 +
    sigma_data^2) (so f(x, sigma_min) = x); the loss is the mean squared difference of f_student(x, sigma) and
    f_target(x_next, sigma_next) over rows and coordinates."""
    def rows(v):
        return v.reshape(-1, *([1] * (x0.ndim - 1)))

    def f(net, x, s):
        t = rows(s - sigma_min)
        return sigma_data**2 / (t**2 + sigma_data**2) * x + t / (t**2 + sigma_data**2).sqrt() * net(x, s)

    s, s_next = rows(sigma), rows(sigma_next)
    x = x0 + s * noise
    d = (x - teacher(x, sigma)) / s
    x_euler = x + (s_next - s) * d
    d_next = (x_euler - teacher(x_euler, sigma_next)) / s_next
    x_next = x + (s_next - s) * (d + d_next) / 2
    return ((f(student, x, sigma) - f(target, x_next, sigma_next)) ** 2).mean()


def _inputs_cd(gen):
    """B rows of D coordinates, each row a neighbouring pair of a Karras grid of 10-40 intervals from sigma_min to 80;
    the student and its EMA target are two fixed toy networks with nearby weights, the teacher a toy denoiser."""
    b, dim = _T._randint(gen, 6, 12), _T._randint(gen, 2, 6)
    n, sigma_min = _T._randint(gen, 10, 40), round(_T._uniform(gen, 0.002, 0.02), 4)
    ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    grid = (sigma_min ** (1 / 7) + ramp * (80 ** (1 / 7) - sigma_min ** (1 / 7))) ** 7
    i = torch.randint(n, (b,), generator=gen)
    w = _T._uniform(gen, 0.4, 1.2)
    return {"student": ToyRowNetwork(w, _T._uniform(gen, -0.3, 0.3)),
            "target": ToyRowNetwork(w * _T._uniform(gen, 0.9, 1.1), _T._uniform(gen, -0.3, 0.3)),
            "teacher": ToyRowDenoiser(_T._uniform(gen, 0.5, 1.5)),
            "x0": torch.randn(b, dim, generator=gen, dtype=torch.float64),
            "noise": torch.randn(b, dim, generator=gen, dtype=torch.float64),
            "sigma": grid[i + 1], "sigma_next": grid[i], "sigma_data": round(_T._uniform(gen, 0.3, 1.0), 3),
            "sigma_min": sigma_min}


def _cd_with(mistake: str):
    def fn(student, target, teacher, x0, noise, sigma, sigma_next, sigma_data, sigma_min):
        def rows(v):
            return v.reshape(-1, *([1] * (x0.ndim - 1)))

        def f(net, x, s):
            if mistake == "no boundary":
                return net(x, s)
            t = rows(s if mistake == "no sigma_min" else s - sigma_min)
            return sigma_data**2 / (t**2 + sigma_data**2) * x + t / (t**2 + sigma_data**2).sqrt() * net(x, s)

        s, s_next = rows(sigma), rows(sigma_next)
        x = x0 + s * noise
        d = (x - teacher(x, sigma)) / s
        x_next = x + (s_next - s) * d
        if mistake != "euler":
            d_next = (x_next - teacher(x_next, sigma_next)) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        if mistake == "target at sigma":
            return ((f(student, x, sigma) - f(target, x_next, sigma)) ** 2).mean()
        if mistake == "swapped":
            return ((f(target, x, sigma) - f(student, x_next, sigma_next)) ** 2).mean()
        err = (f(student, x, sigma) - f(target, x_next, sigma_next)) ** 2
        return err.sum(1).mean() if mistake == "summed" else err.mean()
    return fn


register(Exercise(
    "consistency_distillation_loss", 12, ref_consistency_distillation_loss, _inputs_cd,
    "x = x0 + sigma * noise (sigma one per row); one Heun step of the teacher from sigma to sigma_next gives x_next; "
    "f(net, x, s) = c_skip x + c_out net(x, s) with c_skip = sigma_data^2 / ((s - sigma_min)^2 + sigma_data^2) and "
    "c_out = (s - sigma_min) / sqrt((s - sigma_min)^2 + sigma_data^2); return the mean of (f(student, x, sigma) - "
    "f(target, x_next, sigma_next))^2.",
    mistakes=((_cd_with("euler"), "The teacher's step is Heun's: correct the Euler guess with the slope at it, "
               "and average the two slopes."),
              (_cd_with("target at sigma"), "The target sees the point one step down the trajectory at its own level: "
               "f(target, x_next, sigma_next)."),
              (_cd_with("no boundary"), "Read each network through the boundary condition, f = c_skip x + c_out "
               "net(x, s): that is what makes f(x, sigma_min) = x."),
              (_cd_with("no sigma_min"), "The coefficients use s - sigma_min, so that c_skip = 1 and c_out = 0 exactly "
               "at sigma_min."),
              (_cd_with("swapped"), "The student (the network trained) gets the noisier point x at sigma; the target "
               "(its EMA) gets x_next at sigma_next."),
              (_cd_with("summed"), "Average the squared differences over coordinates as well as rows (.mean())."),
              ),
    refused=FEW_STEP_LIBRARIES, rule=FEW_STEP_RULE))


# ---- 12.1 one progressive-distillation target ---------------------------------------------------------------------


def ref_progressive_target(teacher, x, sigma, sigma_mid, sigma_next):
    """Salimans & Ho 2022, Algorithm 2, in the sigma view: two DDIM (Euler) steps of the teacher, sigma -> sigma_mid ->
    sigma_next, land on x''; the student's target is the x0 estimate with which ONE DDIM step from x lands there:
    (x'' - (sigma_next / sigma) x) / (1 - sigma_next / sigma)."""
    x_mid = x + (sigma_mid - sigma) * (x - teacher(x, sigma)) / sigma
    x_end = x_mid + (sigma_next - sigma_mid) * (x_mid - teacher(x_mid, sigma_mid)) / sigma_mid
    ratio = sigma_next / sigma
    return (x_end - ratio * x) / (1 - ratio)


def _inputs_pd(gen):
    """Three levels of a halving grid (sigma from 0.5 to 80, sigma_next 0 one time in four), a toy teacher."""
    b, dim = _T._randint(gen, 4, 10), _T._randint(gen, 2, 6)
    sigma = _T._uniform(gen, 0.5, 80.0)
    sigma_mid = sigma * _T._uniform(gen, 0.2, 0.7)
    sigma_next = 0.0 if float(torch.rand(1, generator=gen)) < 0.25 else sigma_mid * _T._uniform(gen, 0.2, 0.7)
    return {"teacher": ToyDenoiser(_T._uniform(gen, 0.5, 1.5)),
            "x": torch.randn(b, dim, generator=gen, dtype=torch.float64) * (1 + sigma),
            "sigma": round(sigma, 4), "sigma_mid": round(sigma_mid, 4), "sigma_next": round(sigma_next, 4)}


def _pd_with(mistake: str):
    def fn(teacher, x, sigma, sigma_mid, sigma_next):
        if mistake == "one step":
            return teacher(x, sigma)
        x_mid = x + (sigma_mid - sigma) * (x - teacher(x, sigma)) / sigma
        x_end = x_mid + (sigma_next - sigma_mid) * (x_mid - teacher(x_mid, sigma_mid)) / sigma_mid
        if mistake == "two-step point":
            return x_end
        ratio = sigma_next / (sigma_mid if mistake == "ratio to sigma_mid" else sigma)
        return (x_end - ratio * x) / (1 - ratio)
    return fn


register(Exercise(
    "progressive_target", 12, ref_progressive_target, _inputs_pd,
    "Two Euler steps of the teacher: x_mid = x + (sigma_mid - sigma) (x - teacher(x, sigma)) / sigma, then x'' from "
    "x_mid to sigma_next the same way; return (x'' - (sigma_next / sigma) x) / (1 - sigma_next / sigma).",
    mistakes=((_pd_with("one step"), "The target is where the teacher's TWO steps land, not its one-step estimate "
               "teacher(x, sigma)."),
              (_pd_with("two-step point"), "x'' is a point at sigma_next, not an x0 estimate: solve x'' = x + "
               "(sigma_next - sigma) (x - x0~) / sigma for x0~ (the student takes one step from x)."),
              (_pd_with("ratio to sigma_mid"), "The student's single step goes from sigma to sigma_next: the ratio is "
               "sigma_next / sigma.")),
    refused=FEW_STEP_LIBRARIES, rule=FEW_STEP_RULE))


# ---- 12.4 the latent consistency model's teacher step: guidance folded into the target --------------------------


def ref_guided_teacher_step(teacher, x, sigma, sigma_next, context, null_context, w):
    """Luo et al. 2023 (LCM), the teacher's step of guided consistency distillation in the sigma view: one Heun step of
    the probability-flow ODE dx/dsigma = (x - D_w(x, sigma)) / sigma from sigma to sigma_next (one per row) with the
    guided denoiser D_w(y, s) = teacher(y, s, null_context) + w (teacher(y, s, context) - teacher(y, s, null_context))."""
    def rows(v):
        return v.reshape(-1, *([1] * (x.ndim - 1)))

    def guided(y, s):
        uncond = teacher(y, s, null_context)
        return uncond + w * (teacher(y, s, context) - uncond)

    s, s_next = rows(sigma), rows(sigma_next)
    d = (x - guided(x, sigma)) / s
    x_euler = x + (s_next - s) * d
    d_next = (x_euler - guided(x_euler, sigma_next)) / s_next
    return x + (s_next - s) * (d + d_next) / 2


def _inputs_guided(gen):
    """B rows at neighbouring levels of a Karras grid up to 20, a caption row and the empty caption's row per sample
    (the empty caption is a caption too: its states are not zero), a toy text denoiser, w between 1.5 and 7."""
    b, dim = _T._randint(gen, 4, 10), _T._randint(gen, 2, 6)
    n = _T._randint(gen, 10, 30)
    ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    grid = (0.002 ** (1 / 7) + ramp * (20 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    i = torch.randint(n, (b,), generator=gen)
    return {"teacher": ToyTextDenoiser(_T._uniform(gen, 0.5, 1.5)),
            "x": torch.randn(b, dim, generator=gen, dtype=torch.float64) * (1 + grid[i + 1]).reshape(-1, 1),
            "sigma": grid[i + 1], "sigma_next": grid[i],
            "context": torch.randn(b, dim, generator=gen, dtype=torch.float64),
            "null_context": 0.3 * torch.randn(1, dim, generator=gen, dtype=torch.float64).expand(b, dim).clone(),
            "w": round(_T._uniform(gen, 1.5, 7.0), 3)}


def _guided_with(mistake: str):
    def fn(teacher, x, sigma, sigma_next, context, null_context, w):
        def rows(v):
            return v.reshape(-1, *([1] * (x.ndim - 1)))

        def guided(y, s):
            cond = teacher(y, s, context)
            uncond = teacher(y, s, torch.zeros_like(null_context) if mistake == "zero null" else null_context)
            if mistake == "no guidance":
                return cond
            return uncond + (1 + w if mistake == "one plus w" else w) * (cond - uncond)

        s, s_next = rows(sigma), rows(sigma_next)
        d = (x - guided(x, sigma)) / s
        x_euler = x + (s_next - s) * d
        if mistake == "euler":
            return x_euler
        second = teacher(x_euler, sigma_next, context) if mistake == "guided once" else guided(x_euler, sigma_next)
        return x + (s_next - s) * (d + (x_euler - second) / s_next) / 2
    return fn


register(Exercise(
    "guided_teacher_step", 12, ref_guided_teacher_step, _inputs_guided,
    "D_w(y, s) = teacher(y, s, null_context) + w (teacher(y, s, context) - teacher(y, s, null_context)); return one "
    "Heun step of dx/dsigma = (x - D_w(x, sigma)) / sigma from sigma to sigma_next (one per row).",
    mistakes=((_guided_with("no guidance"), "The teacher's step is the guided one: combine the conditional and the "
               "empty-caption predictions with w at every call."),
              (_guided_with("one plus w"), "That is the (1 + w) convention (the same as starting from the "
               "conditional prediction): here D_w = teacher(y, s, null_context) + w (conditional - unconditional), "
               "so w = 1 gives the conditional denoiser."),
              (_guided_with("zero null"), "The unconditional prediction uses the empty caption's states, "
               "null_context, which are not zeros."),
              (_guided_with("euler"), "The teacher's step is Heun's: correct the Euler guess with the slope at it, "
               "and average the two slopes."),
              (_guided_with("guided once"), "Heun's second slope is taken with the guided denoiser too.")),
    refused=FEW_STEP_LIBRARIES, rule=FEW_STEP_RULE))


# ---- 12.3 multistep consistency sampling, graded on behaviour -----------------------------------------------------

# Calibrated by `python -m course_lib bench exercises --only consistency_sample` (data/bench_exercises.json; one
# thread, 0.3-0.6 s a check): the reference 100/100 (hq 0.988-0.999, the noise std ratio 0.947-1.04, correlations at
# most 0.072), two honest styles 50/50 each; tau instead of sqrt(tau^2 - sigma_min^2): ratio 1.13-1.34; a reused z:
# correlation 1; the noisy point returned; the noisy input noised again: ratio 2.1-3.9; every mistake 0 passed with its
# own hint, every shortcut 0/15
CONSISTENCY_HQ_FLOOR = 0.9  # the share of samples within 3 std of a mode (the modes blurred by sigma_min): exact
# samples 0.99+
NOISE_STD_TOLERANCE = 0.08  # |std of the noise added before a call / sqrt(tau^2 - sigma_min^2) - 1|: 2,000 values
# give a standard error of 1.6%; the mistake of adding tau z instead is 15-34% off at the last level
CORRELATION_LIMIT = 0.15  # |correlation| of the noise added before a call with the earlier noises (standard error 0.022)
FLOW_STEPS = 40  # Heun steps of the exact consistency function's ODE solve (Karras levels)


def ref_consistency_sample(f, noise, sigmas, sigma_min):
    """Song et al. 2023, Algorithm 1: x = f(sigmas[0] noise, sigmas[0]); then for each next level tau, a fresh
    z ~ N(0, I), x = f(x + sqrt(tau^2 - sigma_min^2) z, tau). One call of f per level."""
    x = f(noise * float(sigmas[0]), float(sigmas[0]))
    for tau in sigmas[1:].tolist():
        x = f(x + math.sqrt(tau * tau - sigma_min * sigma_min) * torch.randn_like(x), tau)
    return x


def exact_consistency(mix, sigma_min: float, steps: int = FLOW_STEPS):
    """f*(x, sigma): where the mixture's probability-flow ODE takes x from sigma down to sigma_min (Heun on Karras
    levels with the exact mixture denoiser): the consistency function a perfect consistency model learns."""
    from ..analytic import mixture_denoiser
    from ..consistency import ode_flow_map

    exact = mixture_denoiser(mix)

    def f(x, sigma):
        return ode_flow_map(exact, x.double(), float(sigma), sigma_min, steps).float() if sigma > sigma_min else x
    return f


def consistency_task(gen: torch.Generator) -> _T.Task:
    """consistency_sample(f, noise, sigmas, sigma_min) with f the exact consistency function of a fresh separated
    mixture, sigma_min 0.15-0.3, 3-4 levels from 8-15 down to 1.5-2 sigma_min, one call of f per level."""
    mix = _T.separated_mixture(gen)
    sigma_min = round(_T._uniform(gen, 0.15, 0.3), 4)
    k = _T._randint(gen, 3, 4)  # three or more: a z reused between two noisings shows
    top, low = _T._uniform(gen, 8, 15), sigma_min * _T._uniform(gen, 1.5, 2.0)
    ramp = torch.linspace(0, 1, k, dtype=torch.float64)
    sigmas = ((top ** (1 / 3) + ramp * (low ** (1 / 3) - top ** (1 / 3))) ** 3).float()
    noise = torch.randn(_T.SAMPLE_POINTS, 2, generator=gen)
    f = Oracle("f", exact_consistency(mix, sigma_min), _T._points_and_level(_T.SAMPLE_POINTS), k,
               budget_text=f"one call per level of the {k} levels", note=lambda a: {"x": a[0].float(), "sigma": a[1]})
    return _T.Task([_T.Call({"f": OracleRef("f"), "noise": noise, "sigmas": sigmas, "sigma_min": sigma_min},
                            {"f": f})], {"mixture": mix, "sigma_min": sigma_min, "sigmas": sigmas, "noise": noise})


def _fail(message: str, hint: str) -> CheckResult:
    return CheckResult("consistency_sample", FAILED, message, hint)


def consistency_measure(task, outputs: list) -> tuple[CheckResult | None, dict]:
    """(the verdict, None when right; what the judge measured): each level called once, in order; the first call at
    sigmas[0] * noise; before each later call, fresh noise of std sqrt(tau^2 - sigma_min^2) added to the previous
    call's output; the result is the last call's output; the samples are the mixture's (blurred by sigma_min)."""
    from ..data import GaussianMixture2D

    p = task.private
    x = outputs[0]
    verdict = _points_or_verdict("consistency_sample", x)
    if verdict:
        return verdict, {}
    log, levels = task.calls[0].oracles["f"].log, p["sigmas"].tolist()
    seen = [c["sigma"] for c in log]
    if len(seen) != len(levels) or any(abs(a - b) > 1e-4 * b for a, b in zip(seen, levels)):
        return _fail(f"f was called at levels {[round(s, 3) for s in seen]}; the levels given were "
                     f"{[round(s, 3) for s in levels]}.", "Call f once per level, in the order given: first at "
                     "sigmas[0], then once at each later level."), {}
    if not torch.allclose(log[0]["x"], p["noise"] * levels[0], rtol=1e-4, atol=1e-4):
        return _fail("the first call of f was not at sigmas[0] * noise.", "Start from x = sigmas[0] * noise: pure "
                     "noise at the top level (noise is standard normal)."), {}
    f = exact_consistency(p["mixture"], p["sigma_min"])
    outs = [f(c["x"], c["sigma"]) for c in log]
    if not torch.allclose(x.float(), outs[-1], atol=1e-3):
        return _fail("what you returned is not the output of the last call of f.", "Return f's output at the last "
                     "level (the estimate of the data), not the noisy point you gave it."), {}
    added, ratios, corrs = [], [], []
    for k in range(1, len(log)):
        r = log[k]["x"].double() - outs[k - 1].double()
        want = math.sqrt(levels[k] ** 2 - p["sigma_min"] ** 2)
        ratio = float(r.std()) / want
        ratios.append(ratio)
        if abs(ratio - 1) > NOISE_STD_TOLERANCE or abs(float(r.mean())) > 5 * want / math.sqrt(r.numel()):
            return _fail(f"before the call at level {levels[k]:.3g}, the point you passed differs from f's previous "
                         f"output by noise of std {float(r.std()):.3g}; it should be {want:.3g} (ratio {ratio:.2f}).",
                         "Noise the previous ESTIMATE back up: x = f_output + sqrt(tau^2 - sigma_min^2) * z with a "
                         "fresh standard normal z."), {"std_ratio": ratio}
        for earlier in [p["noise"].double(), *added]:
            corr = float(torch.corrcoef(torch.stack([r.flatten(), earlier.flatten()]))[0, 1])
            corrs.append(abs(corr))
            if abs(corr) > CORRELATION_LIMIT:
                return _fail(f"the noise added before the call at level {levels[k]:.3g} is correlated with earlier "
                             f"noise (correlation {corr:.2f}).", "Draw a fresh z at every level "
                             "(torch.randn_like), never reuse one."), {"correlation": abs(corr)}
        added.append(r / want)
    mix = p["mixture"]
    blurred = GaussianMixture2D(mix.name, mix.modes, math.sqrt(mix.std**2 + p["sigma_min"] ** 2))
    hq, counts, _ = _quality(x.float(), blurred)
    fair = MODE_SHARE * _T.SAMPLE_POINTS / len(mix.modes)
    measured = {"hq": hq, "std_ratio_worst": max(ratios, key=lambda v: abs(v - 1)), "correlation_max": max(corrs)}
    if hq < CONSISTENCY_HQ_FLOOR or bool((counts < fair).any()):
        return _fail(f"{hq:.0%} of your samples are near a mode (need {CONSISTENCY_HQ_FLOOR:.0%}), the emptiest mode "
                     f"holds {int(counts.min())}.", "Return f's output at the last level."), measured
    return None, measured


def assess_consistency_sample(task, outputs: list) -> CheckResult | None:
    """The verdict of consistency_measure."""
    return consistency_measure(task, outputs)[0]


def _consistency_with(mistake: str):
    def fn(f, noise, sigmas, sigma_min):
        x = f(noise * float(sigmas[0]), float(sigmas[0]))
        z = torch.randn_like(x)
        for tau in sigmas[1:].tolist():
            scale = tau if mistake == "tau" else math.sqrt(tau * tau - sigma_min * sigma_min)
            z = z if mistake == "same z" else torch.randn_like(x)
            x_tau = x + scale * z
            x = f(x_tau, tau)
        return x_tau if mistake == "noisy point" else x
    return fn


def _renoise_the_input(f, noise, sigmas, sigma_min):
    """A mistake: noises the previous noisy input up again instead of f's estimate."""
    x_in = noise * float(sigmas[0])
    x = f(x_in, float(sigmas[0]))
    for tau in sigmas[1:].tolist():
        x_in = x_in + math.sqrt(tau * tau - sigma_min * sigma_min) * torch.randn_like(x)
        x = f(x_in, tau)
    return x


def _one_call(f, noise, sigmas, sigma_min):
    """A shortcut: one call at the top level (with an exact f this alone gives good samples)."""
    return f(noise * float(sigmas[0]), float(sigmas[0]))


def _no_call(f, noise, sigmas, sigma_min):
    """A shortcut: never calls f."""
    return noise


def _course_data(f, noise, sigmas, sigma_min):
    """A shortcut: the lesson's ring of 8 Gaussians."""
    from ..data import ring_of_gaussians

    return ring_of_gaussians(8, 1.0, 0.08).sample(len(noise), torch.Generator().manual_seed(0))


register(Exercise(
    "consistency_sample", 12, ref_consistency_sample, None,
    "x = f(sigmas[0] * noise, sigmas[0]); then for each later level tau: x = f(x + sqrt(tau^2 - sigma_min^2) * z, "
    "tau) with a fresh z = torch.randn_like(x). Return x.",
    mistakes=((_consistency_with("tau"), "sqrt(tau^2 - sigma_min^2)"), (_consistency_with("same z"), "fresh z"),
              (_consistency_with("noisy point"), "not the noisy point"), (_renoise_the_input, "previous ESTIMATE")),
    shortcuts=((_one_call, "levels"), (_no_call, "levels"), (_course_data, "levels")),
    trials=3, task=consistency_task, assess=assess_consistency_sample, seconds=60.0, points=2,
    refused=FEW_STEP_LIBRARIES, rule=FEW_STEP_RULE,
    passed_message="on fresh mixtures your sampler called the exact consistency function once per level, noised each "
                   "estimate back up with fresh noise of the right size, and its samples are the mixture's."))

LIBRARY_EQUIVALENTS.update({
    "consistency_distillation_loss": ("course_lib.consistency.consistency_distillation_loss",
                                      "course_lib.consistency.consistency_output", "course_lib.consistency.ode_step",
                                      "course_lib.consistency.boundary_coefficients"),
    "progressive_target": ("course_lib.consistency.progressive_target", "course_lib.consistency.ode_step"),
    "consistency_sample": ("course_lib.consistency.multistep_sample", "course_lib.samplers.sample_consistency"),
})
