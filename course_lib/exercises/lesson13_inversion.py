"""Lesson 13's DDIM inversion, graded on behaviour: the judge samples the noise the learner's inversion returns back down
with its own DDIM loop on the exact denoiser of a fresh Gaussian mixture, and compares the result with the points the
learner inverted (the lesson's other exercises are in lesson13.py, registered before this one)."""
from __future__ import annotations

import torch

from ..grading import tasks as _T
from ..grading.oracles import Oracle, OracleRef, as_float, as_points
from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register

# ---- 13.5 DDIM inversion, graded on behaviour ---------------------------------------------------------------------

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
    "ddim_invert": ("course_lib.inversion.ddim_invert", "course_lib.inversion.reconstruct"),
})
