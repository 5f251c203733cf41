"""Graded exercises: each runs the learner's function against a reference on fresh random inputs.

`check(name, fn)` never raises (except on Ctrl-C): it prints passed / failed (with a hint) / not
attempted and returns a bool. Results are remembered for this session; `progress()` shows the total.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from . import losses, schedules
from .grading.calls import Raised, call_learner
from .grading.calls import clone_inputs as _clone
from .grading.toys import ToyDenoiser as _ToyDenoiser
from .grading.toys import ToyNetwork as _ToyNetwork

PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not_attempted"
_SYMBOL = {PASSED: "✅", FAILED: "❌", NOT_ATTEMPTED: "⬜"}


@dataclass(frozen=True)
class Exercise:
    """One exercise: the reference, a generator of fresh keyword inputs, and known mistakes with hints."""

    name: str
    lesson: int
    reference: Callable
    make_inputs: Callable[[torch.Generator], dict]
    hint: str
    mistakes: tuple = ()  # (wrong implementation, hint shown when the learner's output matches it)
    trials: int = 5
    rtol: float = 1e-5
    atol: float = 1e-6
    points: int = 1
    # graded on behaviour: `harness` (a function of course_lib.grading.harnesses) runs the learner's function in a
    # fixed procedure and returns tensors; `assess(inputs, outputs)` gives the verdict (None: passed)
    harness: str | None = None
    assess: Callable | None = None
    passed_message: str = ""
    seconds: float | None = None  # the grader's time limit per call when it must exceed --call-timeout


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str
    message: str
    hint: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def __str__(self) -> str:
        text = f"{_SYMBOL[self.status]} {self.name}: {self.status.replace('_', ' ')}. {self.message}"
        return text + (f"\n   Hint: {self.hint}" if self.hint else "")


EXERCISES: dict[str, Exercise] = {}
# course_lib functions that compute an exercise's answer: the grader flags a graded function that calls one.
LIBRARY_EQUIVALENTS = {
    "alpha_bar_from_betas": ("course_lib.schedules.alpha_bar_from_betas",),
    "q_sample": ("course_lib.forward.q_sample", "course_lib.forward.q_mean_std", "course_lib.kernels.q_sample",
                 "course_lib.kernels.q_sample_reference"),
    "log_snr": ("course_lib.schedules.log_snr_from_alpha_bar", "course_lib.schedules.snr_from_alpha_bar"),
    "simple_loss": ("course_lib.losses.diffusion_loss",),
    "posterior_mean": ("course_lib.losses.posterior_coefficients", "course_lib.losses.q_posterior"),
    "eps_to_x0": ("course_lib.losses.from_eps", "course_lib.losses.to_eps", "course_lib.losses.convert"),
    "ddim_step": ("course_lib.samplers.sample_ddim", "course_lib.kernels.ddim_step", "course_lib.kernels.euler_step"),
    "heun_step": ("course_lib.samplers.sample_heun", "course_lib.kernels.heun_correct"),
    "karras_sigmas": ("course_lib.samplers.karras_sigmas", "course_lib.samplers.get_sigmas"),
    "reparameterize": ("course_lib.vae.reparameterize",),
    "gaussian_elbo": ("course_lib.vae.gaussian_log_likelihood", "course_lib.vae.kl_to_standard_normal",
                      "course_lib.vae.elbo"),
    "discriminator_loss": ("course_lib.gan.discriminator_loss",),
    "dpmpp_2m_coefficients": ("course_lib.kernels.dpmpp_2m_step", "course_lib.samplers.sample_dpmpp_2m"),
}
_RESULTS: dict[str, CheckResult] = {}


def register(exercise: Exercise) -> Exercise:
    """Add an exercise to the registry (names are unique)."""
    if exercise.name in EXERCISES:
        raise ValueError(f"exercise {exercise.name!r} is already registered")
    EXERCISES[exercise.name] = exercise
    return exercise


def _close(got: torch.Tensor, want: torch.Tensor, ex: Exercise) -> bool:
    return got.shape == want.shape and torch.allclose(got.double(), want.double(), rtol=ex.rtol, atol=ex.atol)


def _matching_mistake(ex: Exercise, inputs: dict, got: torch.Tensor) -> str | None:
    for wrong, hint in ex.mistakes:
        try:
            if _close(got, torch.as_tensor(wrong(**_clone(inputs))), ex):
                return hint
        except Exception:  # a mistake that cannot even run on these inputs is simply not this one
            continue
    return None


def _describe(inputs: dict) -> str:
    parts = []
    for k, v in inputs.items():
        parts.append(f"{k}: {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" if isinstance(v, torch.Tensor)
                     else f"{k}={v!r}")
    return ", ".join(parts)


def judge(ex: Exercise, inputs: dict, want: torch.Tensor | None, got, trial: int = 0) -> CheckResult | None:
    """The verdict on one output of the learner's function (a tensor, a harness's dict of tensors, or a Raised);
    None when it matches the reference (or, for a behaviour exercise, when `assess` finds nothing wrong)."""
    name = ex.name
    if isinstance(got, Raised):
        if got.error == "NotImplementedError":
            return CheckResult(name, NOT_ATTEMPTED, "Your function still raises NotImplementedError.",
                               "Replace the `raise NotImplementedError` line with your code, then run the cell again.")
        if got.error:
            return CheckResult(name, FAILED, f"Your function raised {got.error}: {got.message}",
                               f"It was called with {_describe(inputs)}. {ex.hint}")
        return CheckResult(name, FAILED, f"expected a torch.Tensor, got {got.message}.",
                           "Did you forget a `return` statement?" if got.message == "None" else ex.hint)
    if ex.assess is not None:
        return ex.assess(inputs, got) if isinstance(got, dict) else CheckResult(
            name, FAILED, "the grading procedure returned no result.", "This is a bug in the course: please report it.")
    if got.shape != want.shape:
        return CheckResult(name, FAILED, f"wrong shape: expected {tuple(want.shape)}, got {tuple(got.shape)}.",
                           f"Inputs were {_describe(inputs)}. {ex.hint}")
    if not (got.is_floating_point() or got.is_complex()):
        got = got.double()
    if not torch.isfinite(got).all():
        return CheckResult(name, FAILED, f"your output contains {int((~torch.isfinite(got)).sum())} NaN/inf values.",
                           f"Inputs were {_describe(inputs)}. {ex.hint}")
    if not _close(got, want, ex):
        err = float((got.double() - want.double()).abs().max())
        specific = _matching_mistake(ex, inputs, got)
        return CheckResult(name, FAILED, f"values differ from the reference (max abs error {err:.3g}) "
                           f"on random test {trial + 1} of {ex.trials}.", specific or ex.hint)
    return None


def passed(ex: Exercise) -> CheckResult:
    return CheckResult(ex.name, PASSED, ex.passed_message or f"matches the reference on {ex.trials} fresh random inputs.")


def reference_output(ex: Exercise, inputs: dict):
    """What the learner's output is compared with: the reference's output, or None for a behaviour exercise."""
    return None if ex.assess is not None else ex.reference(**_clone(inputs))


def fresh_inputs(ex: Exercise, seed: int | None = None) -> list[dict]:
    """ex.trials input dicts from a generator seeded with `seed` (a secret random seed when None)."""
    gen = torch.Generator().manual_seed(secrets.randbits(62) if seed is None else seed)
    return [ex.make_inputs(gen) for _ in range(ex.trials)]


def run_check(name: str, fn, seed: int | None = None) -> CheckResult:
    """Grade fn against exercise `name` on fresh random inputs; returns a CheckResult and never raises."""
    ex = EXERCISES.get(name)
    if ex is None:
        return CheckResult(name, FAILED, f"there is no exercise called {name!r}.",
                           f"Known exercises: {', '.join(sorted(EXERCISES))}.")
    if not callable(fn):
        return CheckResult(name, FAILED, f"expected your function, got {type(fn).__name__}.",
                           f"Pass the function itself, without calling it: check({name!r}, {name}).")
    for trial, inputs in enumerate(fresh_inputs(ex, seed)):
        verdict = judge(ex, inputs, reference_output(ex, inputs), call_learner(fn, inputs, ex.harness), trial)
        if verdict is not None:
            return verdict
    return passed(ex)


class Verdict:
    """What `check` returns: true when the exercise passed (`if check(...)`, `== True` work). It displays nothing in
    a notebook, because check has already printed the verdict (a bare True / False under it was noise)."""

    __slots__ = ("name", "passed")

    def __init__(self, name: str, passed: bool):
        self.name, self.passed = name, bool(passed)

    def __bool__(self) -> bool:
        return self.passed

    def __eq__(self, other):
        if isinstance(other, (bool, Verdict)):
            return self.passed == bool(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.passed)

    def __repr__(self) -> str:
        return f"Verdict({self.name!r}, passed={self.passed})"

    def _ipython_display_(self) -> None:  # IPython shows no Out[n] for an object that displays itself as nothing
        return None


class Score(NamedTuple):
    """What `progress` returns: (points, total), a plain tuple that displays nothing in a notebook (it printed)."""

    points: int
    total: int

    def _ipython_display_(self) -> None:
        return None


def check(name: str, fn) -> Verdict:
    """Check your function for exercise `name`: prints passed / failed with a hint / not attempted; returns a Verdict,
    true when it passed."""
    try:
        result = run_check(name, fn)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a bug in a reference must still not raise in a learner's face
        result = CheckResult(str(name), FAILED, f"the checker itself failed ({type(e).__name__}: {e}).",
                             "This is a bug in the course, not your code: please report it.")
    _RESULTS[result.name] = result
    print(result)
    return Verdict(result.name, result.passed)


def progress(lesson: int | None = None) -> Score:
    """Print the status of every exercise (of one lesson if given) checked this session; return (points, total)."""
    names = [n for n, ex in EXERCISES.items() if lesson is None or ex.lesson == lesson]
    got = total = 0
    for n in names:
        ex, res = EXERCISES[n], _RESULTS.get(n)
        status = res.status if res else NOT_ATTEMPTED
        total += ex.points
        got += ex.points if status == PASSED else 0
        print(f"{_SYMBOL[status]} lesson {ex.lesson}  {n:<24} {status.replace('_', ' ')}")
    print(f"Total: {got} / {total} points")
    return Score(got, total)


# ---- the exercises ------------------------------------------------------------------------------

_RESHAPE_HINT = ("A per-sample value of shape (B,) must be reshaped to broadcast over the other "
                 "dimensions, e.g. v.view(-1, *[1] * (x.ndim - 1)).")


def _batch(gen: torch.Generator) -> tuple[int, tuple]:
    b = int(torch.randint(3, 7, (1,), generator=gen))
    shape = [(b, 2), (b, 1, 8, 8), (b, 3, 5, 4)][int(torch.randint(3, (1,), generator=gen))]
    return b, shape


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def ref_noise_images(x, sigma, noise):
    """Lesson 0 warm-up: x + sigma * noise with one sigma per sample."""
    return x + _per_sample(sigma, x) * noise


def _inputs_noise_images(gen):
    b, shape = _batch(gen)
    return {"x": torch.rand(shape, generator=gen) * 2 - 1, "sigma": torch.rand(b, generator=gen) * 2,
            "noise": torch.randn(shape, generator=gen)}


register(Exercise(
    "noise_images", 0, ref_noise_images, _inputs_noise_images,
    "Each sample i gets x[i] + sigma[i] * noise[i]. " + _RESHAPE_HINT,
    mistakes=((lambda x, sigma, noise: x + sigma.mean() * noise, "Use each sample's own sigma[i], not one shared value."),
              (lambda x, sigma, noise: x + _per_sample(sigma, x) ** 2 * noise,
               "sigma is a standard deviation: multiply the noise by sigma, not sigma squared."),
              (lambda x, sigma, noise: _per_sample(sigma, x) * noise, "Keep the image: the result is x plus the noise."))))


def ref_alpha_bar_from_betas(betas):
    """alpha_bar[t] = prod_{s<=t} (1 - beta[s]) (Ho et al. 2020, eq. 4)."""
    return schedules.alpha_bar_from_betas(betas)


def _inputs_betas(gen):
    n = int(torch.randint(5, 60, (1,), generator=gen))
    return {"betas": (1e-4 + 0.1 * torch.rand(n, generator=gen)).double()}


register(Exercise(
    "alpha_bar_from_betas", 1, ref_alpha_bar_from_betas, _inputs_betas,
    "alpha_t = 1 - beta_t, and alpha_bar_t is the running product alpha_0 * ... * alpha_t (torch.cumprod).",
    mistakes=((lambda betas: torch.cumsum(1 - betas, 0), "Use a running product (torch.cumprod), not a sum."),
              (lambda betas: torch.cumprod(betas, 0), "The product is over alpha_t = 1 - beta_t, not over beta_t."),
              (lambda betas: torch.cat([betas.new_ones(1), torch.cumprod(1 - betas, 0)[:-1]]),
               "Off by one: alpha_bar[0] already includes the first step, alpha_bar[0] = 1 - beta[0]."),
              (lambda betas: 1 - torch.cumprod(1 - betas, 0), "That is 1 - alpha_bar: return alpha_bar itself."),
              (lambda betas: torch.prod(1 - betas).expand(len(betas)),
               "Return one value per step (the running product), not the total product."))))


def ref_q_sample(x0, t, alpha_bar, noise):
    """x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise, per sample (Ho et al. 2020, eq. 4)."""
    ab = _per_sample(alpha_bar[t], x0).to(x0.dtype)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def _inputs_q_sample(gen):
    b, shape = _batch(gen)
    T = int(torch.randint(20, 200, (1,), generator=gen))
    betas = torch.linspace(1e-4, 0.05, T, dtype=torch.float64) * (0.5 + torch.rand(1, generator=gen).double())
    return {"x0": torch.rand(shape, generator=gen) * 2 - 1, "t": torch.randint(T, (b,), generator=gen),
            "alpha_bar": schedules.alpha_bar_from_betas(betas).float(), "noise": torch.randn(shape, generator=gen)}


def _q_sample_mistake(f):
    def wrong(x0, t, alpha_bar, noise):
        ab = _per_sample(alpha_bar[t], x0)
        return f(ab, x0, noise)
    return wrong


register(Exercise(
    "q_sample", 1, ref_q_sample, _inputs_q_sample,
    "x_t = sqrt(alpha_bar[t]) * x0 + sqrt(1 - alpha_bar[t]) * noise, with alpha_bar[t] of shape (B,) reshaped "
    "to broadcast over the sample's other dimensions. " + _RESHAPE_HINT,
    mistakes=((_q_sample_mistake(lambda ab, x0, n: ab * x0 + (1 - ab) * n),
               "Take square roots: the mean is sqrt(alpha_bar) x0 and the standard deviation sqrt(1 - alpha_bar)."),
              (_q_sample_mistake(lambda ab, x0, n: (1 - ab).sqrt() * x0 + ab.sqrt() * n),
               "The weights are swapped: x0 is scaled by sqrt(alpha_bar), the noise by sqrt(1 - alpha_bar)."),
              (_q_sample_mistake(lambda ab, x0, n: ab.sqrt() * x0 + (1 - ab) * n),
               "The noise is scaled by the standard deviation sqrt(1 - alpha_bar), not the variance."),
              (lambda x0, t, alpha_bar, noise: ref_q_sample(x0, t - 1, alpha_bar, noise),
               "Off by one: use alpha_bar[t] itself (our t counts from 0)."))))


def ref_log_snr(alpha_bar):
    """log SNR = log(alpha_bar / (1 - alpha_bar)) (Kingma et al. 2021, eq. 2)."""
    return schedules.log_snr_from_alpha_bar(alpha_bar).to(alpha_bar.dtype)


def _inputs_log_snr(gen):
    n = int(torch.randint(5, 60, (1,), generator=gen))
    return {"alpha_bar": torch.rand(n, generator=gen).double() * 0.998 + 0.001}


register(Exercise(
    "log_snr", 1, ref_log_snr, _inputs_log_snr,
    "The signal variance is alpha_bar and the noise variance 1 - alpha_bar; log-SNR is the log of their ratio.",
    mistakes=((lambda alpha_bar: alpha_bar / (1 - alpha_bar), "That is the SNR itself: take its logarithm."),
              (lambda alpha_bar: torch.log((1 - alpha_bar) / alpha_bar),
               "Sign flipped: signal over noise is alpha_bar / (1 - alpha_bar)."),
              (lambda alpha_bar: torch.log(alpha_bar.sqrt() / (1 - alpha_bar).sqrt()),
               "SNR is a ratio of variances, not of standard deviations: drop the square roots."))))


# ---- lesson 2: the denoising objective -----------------------------------------------------------


def _inputs_schedule_batch(gen, t_min: int = 0):
    b, shape = _batch(gen)
    T = int(torch.randint(20, 200, (1,), generator=gen))
    betas = torch.linspace(1e-4, 0.05, T, dtype=torch.float64) * (0.5 + torch.rand(1, generator=gen).double())
    return b, shape, T, {"t": torch.randint(t_min, T, (b,), generator=gen),
                         "alpha_bar": schedules.alpha_bar_from_betas(betas).float()}


def ref_simple_loss(model, x0, t, noise, alpha_bar):
    """L_simple = mean ||noise - model(x_t, t)||^2 with x_t from q(x_t | x0) (Ho et al. 2020, eq. 14)."""
    return ((noise - model(ref_q_sample(x0, t, alpha_bar, noise), t)) ** 2).mean()


def _inputs_simple_loss(gen):
    b, shape, T, d = _inputs_schedule_batch(gen)
    return {"model": _ToyNetwork(0.5 + torch.rand(1, generator=gen).item(), T),
            "x0": torch.rand(shape, generator=gen) * 2 - 1, "noise": torch.randn(shape, generator=gen), **d}


register(Exercise(
    "simple_loss", 2, ref_simple_loss, _inputs_simple_loss,
    "Noise x0 to x_t with the closed form (your q_sample from lesson 1), ask model(x_t, t) for the noise, and "
    "return the mean squared error against the true noise, averaged over every element: a scalar.",
    mistakes=((lambda model, x0, t, noise, alpha_bar: ((x0 - model(ref_q_sample(x0, t, alpha_bar, noise), t)) ** 2).mean(),
               "The network predicts the noise: compare with `noise`, not with x0."),
              (lambda model, x0, t, noise, alpha_bar: ((noise - model(x0, t)) ** 2).mean(),
               "The network sees the noised x_t, not the clean x0."),
              (lambda model, x0, t, noise, alpha_bar: ((noise - model(ref_q_sample(x0, t, alpha_bar, noise), t)) ** 2).sum(),
               "Average over all elements (.mean()), do not sum: the scale must not depend on the batch or image size."),
              (lambda model, x0, t, noise, alpha_bar: (noise - model(ref_q_sample(x0, t, alpha_bar, noise), t)).abs().mean(),
               "Square the error: the ELBO gives a squared error, not an absolute one."))))


def ref_posterior_mean(x0, x_t, t, alpha_bar):
    """Mean of q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 7), with alpha_bar_{-1} = 1 at our t = 0."""
    ab = alpha_bar.double()
    coef_x0, coef_xt, _ = losses.posterior_coefficients(ab, torch.cat([ab.new_ones(1), ab[:-1]]))
    return (_per_sample(coef_x0[t], x0) * x0 + _per_sample(coef_xt[t], x0) * x_t).to(x0.dtype)


def _inputs_posterior_mean(gen):
    b, shape, T, d = _inputs_schedule_batch(gen)
    if b > 3:
        d["t"][0] = 0  # always test the first step, where alpha_bar_prev = 1
    return {"x0": torch.rand(shape, generator=gen) * 2 - 1, "x_t": torch.randn(shape, generator=gen), **d}


def _posterior_mistake(coefs):
    def wrong(x0, x_t, t, alpha_bar):
        ab = alpha_bar.double()
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        beta = 1 - ab / ab_prev
        a_t, a_p, b_t = (_per_sample(v[t], x0) for v in (ab, ab_prev, beta))
        c0, ct = coefs(a_t, a_p, b_t)
        return (c0 * x0 + ct * x_t).to(x0.dtype)
    return wrong


register(Exercise(
    "posterior_mean", 2, ref_posterior_mean, _inputs_posterior_mean,
    "mean = sqrt(ab_prev) beta_t / (1 - ab_t) * x0 + sqrt(alpha_t) (1 - ab_prev) / (1 - ab_t) * x_t, where "
    "ab_prev = alpha_bar[t-1] (and 1 when t = 0), alpha_t = alpha_bar[t] / ab_prev and beta_t = 1 - alpha_t. "
    + _RESHAPE_HINT,
    mistakes=((_posterior_mistake(lambda a_t, a_p, b_t: ((1 - b_t).sqrt() * (1 - a_p) / (1 - a_t),
                                                         a_p.sqrt() * b_t / (1 - a_t))),
               "The two coefficients are swapped: x0 gets sqrt(ab_prev) beta_t / (1 - ab_t)."),
              (_posterior_mistake(lambda a_t, a_p, b_t: (a_p * b_t / (1 - a_t), (1 - b_t) * (1 - a_p) / (1 - a_t))),
               "Take square roots of ab_prev and of alpha_t in the coefficients."),
              (lambda x0, x_t, t, alpha_bar: ref_posterior_mean(x0, x_t, t, torch.cat([alpha_bar[1:], alpha_bar[-1:]])),
               "Off by one: ab_t is alpha_bar[t] and ab_prev is alpha_bar[t-1] (1 at t = 0)."),
              (_posterior_mistake(lambda a_t, a_p, b_t: (a_p.sqrt() * b_t / (1 - a_t), (1 - a_p) / (1 - a_t))),
               "x_t's coefficient has a factor sqrt(alpha_t) = sqrt(1 - beta_t).")),
    rtol=1e-4, atol=2e-4))  # float32 inputs: 1 - alpha_bar loses digits near t = 0 (seen: 6.6e-5 apart)


def ref_eps_to_x0(eps, x_t, t, alpha_bar):
    """x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (Ho et al. 2020, eq. 15)."""
    ab = _per_sample(alpha_bar[t], x_t).to(x_t.dtype)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def _inputs_eps_to_x0(gen):
    b, shape, T, d = _inputs_schedule_batch(gen)
    return {"eps": torch.randn(shape, generator=gen), "x_t": torch.randn(shape, generator=gen), **d}


register(Exercise(
    "eps_to_x0", 2, ref_eps_to_x0, _inputs_eps_to_x0,
    "Solve x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps for x0. " + _RESHAPE_HINT,
    mistakes=((lambda eps, x_t, t, alpha_bar: x_t - _per_sample((1 - alpha_bar[t]).sqrt(), x_t) * eps,
               "After subtracting the noise, divide by sqrt(alpha_bar_t)."),
              (lambda eps, x_t, t, alpha_bar: (x_t - _per_sample(1 - alpha_bar[t], x_t) * eps) / _per_sample(alpha_bar[t], x_t),
               "Use the square roots: sqrt(1 - alpha_bar_t) and sqrt(alpha_bar_t)."),
              (lambda eps, x_t, t, alpha_bar: (x_t + _per_sample((1 - alpha_bar[t]).sqrt(), x_t) * eps)
               / _per_sample(alpha_bar[t].sqrt(), x_t),
               "Subtract the noise term; do not add it."))))


# Lesson 3: samplers


def ref_ddim_step(x_t, x0_pred, ab_t, ab_s):
    """Deterministic DDIM step t -> s (Song et al. 2021, eq. 12 with sigma = 0): keep the implied noise, move x0's share."""
    eps = (x_t - ab_t**0.5 * x0_pred) / (1 - ab_t) ** 0.5
    return ab_s**0.5 * x0_pred + (1 - ab_s) ** 0.5 * eps


def _inputs_ddim_step(gen):
    _, shape = _batch(gen)
    ab_t = float(torch.rand(1, generator=gen)) * 0.9 + 0.01
    ab_s = ab_t + (1 - ab_t) * float(torch.rand(1, generator=gen)) * 0.9
    return {"x_t": torch.randn(shape, generator=gen), "x0_pred": torch.randn(shape, generator=gen).clamp(-1, 1),
            "ab_t": ab_t, "ab_s": ab_s}


register(Exercise(
    "ddim_step", 3, ref_ddim_step, _inputs_ddim_step,
    "First recover the noise the model implies: eps = (x_t - sqrt(ab_t) x0_pred) / sqrt(1 - ab_t); "
    "then rebuild x_s = sqrt(ab_s) x0_pred + sqrt(1 - ab_s) eps.",
    mistakes=((lambda x_t, x0_pred, ab_t, ab_s: ab_s**0.5 * x0_pred + (1 - ab_s) ** 0.5 * x_t,
               "x_t is not the noise: recover eps from x_t and x0_pred first."),
              (lambda x_t, x0_pred, ab_t, ab_s: ab_s * x0_pred + (1 - ab_s) * (x_t - ab_t * x0_pred) / (1 - ab_t),
               "alpha-bar is a variance: use square roots, sqrt(ab) and sqrt(1 - ab)."),
              (lambda x_t, x0_pred, ab_t, ab_s: x0_pred, "Return x_s, the next noisy state, not the x0 estimate."))))


def ref_heun_step(denoise, x, sigma, sigma_next):
    """One Heun step sigma -> sigma_next > 0 on dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Algorithm 1)."""
    d = (x - denoise(x, sigma)) / sigma
    x_euler = x + (sigma_next - sigma) * d
    d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
    return x + (sigma_next - sigma) * (d + d_next) / 2


def _inputs_heun_step(gen):
    _, shape = _batch(gen)
    w = float(torch.rand(1, generator=gen)) + 0.5
    sigma = float(torch.rand(1, generator=gen)) * 5 + 0.5
    sigma_next = sigma * (float(torch.rand(1, generator=gen)) * 0.7 + 0.1)

    return {"denoise": _ToyDenoiser(w), "x": torch.randn(shape, generator=gen) * (1 + sigma), "sigma": sigma,
            "sigma_next": sigma_next}


def _heun_second_slope(denoise, x, sigma, sigma_next):
    x_euler = x + (sigma_next - sigma) * (x - denoise(x, sigma)) / sigma
    return (x_euler - denoise(x_euler, sigma_next)) / sigma_next


register(Exercise(
    "heun_step", 3, ref_heun_step, _inputs_heun_step,
    "Slope d = (x - denoise(x, sigma)) / sigma; Euler guess x' = x + (sigma_next - sigma) d; slope d' at "
    "(x', sigma_next); result x + (sigma_next - sigma) (d + d') / 2.",
    mistakes=((lambda denoise, x, sigma, sigma_next: x + (sigma_next - sigma) * (x - denoise(x, sigma)) / sigma,
               "That is Euler's step: correct it with the slope at the Euler guess, and average the two slopes."),
              (lambda denoise, x, sigma, sigma_next: x + (sigma_next - sigma) * (
                  (x - denoise(x, sigma)) / sigma + (x - denoise(x, sigma_next)) / sigma_next) / 2,
               "Evaluate the second slope at the Euler guess x', not at the starting point x."),
              (_heun_second_slope,
               "Return the new state x + (sigma_next - sigma) (d + d') / 2, not the second slope."))))


def ref_karras_sigmas(n, sigma_min, sigma_max, rho):
    """n levels from sigma_max to sigma_min evenly spaced in sigma^(1/rho), then a final 0 (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def _inputs_karras(gen):
    return {"n": int(torch.randint(2, 40, (1,), generator=gen)), "sigma_min": float(torch.rand(1, generator=gen)) * 0.05 + 0.002,
            "sigma_max": float(torch.rand(1, generator=gen)) * 100 + 1, "rho": float(torch.randint(1, 10, (1,), generator=gen))}


register(Exercise(
    "karras_sigmas", 3, ref_karras_sigmas, _inputs_karras,
    "Space n points evenly between sigma_max^(1/rho) and sigma_min^(1/rho), raise them to the power rho, "
    "then append a 0: n + 1 values, largest first.",
    mistakes=((lambda n, sigma_min, sigma_max, rho: torch.cat([torch.linspace(sigma_max, sigma_min, n, dtype=torch.float64),
                                                              torch.zeros(1, dtype=torch.float64)]),
               "Space the points evenly in sigma^(1/rho), not in sigma: take the rho-th root first, the rho-th power after."),
              (lambda n, sigma_min, sigma_max, rho: ref_karras_sigmas(n, sigma_min, sigma_max, rho).flip(0),
               "Largest first: a sampler runs from sigma_max down to 0."))))


# Lesson 4: GAN and VAE


def ref_reparameterize(mu, logvar, noise):
    """z = mu + exp(logvar / 2) * noise (Kingma & Welling 2014, eq. 10)."""
    return mu + torch.exp(0.5 * logvar) * noise


def _inputs_reparameterize(gen):
    b, k = int(torch.randint(2, 9, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
    return {"mu": torch.randn(b, k, generator=gen), "logvar": torch.randn(b, k, generator=gen),
            "noise": torch.randn(b, k, generator=gen)}


register(Exercise(
    "reparameterize", 4, ref_reparameterize, _inputs_reparameterize,
    "logvar is log(sigma^2), so sigma = exp(logvar / 2); return mu + sigma * noise.",
    mistakes=((lambda mu, logvar, noise: mu + torch.exp(logvar) * noise,
               "exp(logvar) is the variance sigma^2; scale the noise by the standard deviation exp(logvar / 2)."),
              (lambda mu, logvar, noise: mu + logvar * noise,
               "logvar is a log-variance, not a standard deviation: use exp(logvar / 2)."),
              (lambda mu, logvar, noise: mu + torch.exp(0.5 * logvar),
               "Multiply the standard deviation by the given noise: that is what makes z random."))))


def ref_gaussian_elbo(x, mean, log_scale, mu, logvar):
    """Per-sample ELBO: log N(x; mean, exp(log_scale)^2) summed over dims, minus KL(N(mu, exp(logvar)) || N(0, I))."""
    log_px = (-0.5 * ((x - mean) / log_scale.exp()) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)).sum(1)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    return log_px - kl


def _inputs_elbo(gen):
    b, d, k = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((2, 9), (1, 10), (1, 6)))
    return {"x": torch.randn(b, d, generator=gen), "mean": torch.randn(b, d, generator=gen),
            "log_scale": 0.5 * torch.randn(b, d, generator=gen), "mu": torch.randn(b, k, generator=gen),
            "logvar": 0.5 * torch.randn(b, k, generator=gen)}


def _elbo_without_constant(x, mean, log_scale, mu, logvar):
    return ref_gaussian_elbo(x, mean, log_scale, mu, logvar) + 0.5 * math.log(2 * math.pi) * x.shape[1]


register(Exercise(
    "gaussian_elbo", 4, ref_gaussian_elbo, _inputs_elbo,
    "ELBO = log p(x|z) - KL. log p(x|z) = sum over dims of -(x - mean)^2 / (2 s^2) - log s - log(2 pi) / 2 with "
    "s = exp(log_scale); KL = sum over latents of (mu^2 + exp(logvar) - 1 - logvar) / 2. Return shape (B,).",
    mistakes=((lambda x, mean, log_scale, mu, logvar: ref_gaussian_elbo(x, mean, log_scale, mu, logvar)
               + 2 * 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1),
               "The KL term is subtracted: ELBO = reconstruction - KL."),
              (_elbo_without_constant,
               "Keep the constant -log(2 pi) / 2 per dimension: without it the number is not a log-likelihood bound."),
              (lambda x, mean, log_scale, mu, logvar: ref_gaussian_elbo(x, mean, log_scale, mu, logvar).mean(),
               "Return one ELBO per sample, shape (B,), not the batch mean."))))


def ref_discriminator_loss(real_logits, fake_logits):
    """-log sigmoid(real) - log(1 - sigmoid(fake)), each averaged over its batch (Goodfellow et al. 2014, eq. 1)."""
    return torch.nn.functional.softplus(-real_logits).mean() + torch.nn.functional.softplus(fake_logits).mean()


def _inputs_discriminator(gen):
    n, m = int(torch.randint(2, 30, (1,), generator=gen)), int(torch.randint(2, 30, (1,), generator=gen))
    return {"real_logits": 3 * torch.randn(n, generator=gen), "fake_logits": 3 * torch.randn(m, generator=gen)}


register(Exercise(
    "discriminator_loss", 4, ref_discriminator_loss, _inputs_discriminator,
    "D wants sigmoid(real) -> 1 and sigmoid(fake) -> 0: loss = mean(-log sigmoid(real)) + mean(-log(1 - sigmoid(fake))). "
    "softplus(-a) = -log sigmoid(a) is the stable way to write it.",
    mistakes=((lambda real_logits, fake_logits: ref_discriminator_loss(fake_logits, real_logits),
               "Real and fake are swapped: the discriminator should call real samples real (logit > 0)."),
              (lambda real_logits, fake_logits: torch.nn.functional.softplus(-real_logits).mean()
               + torch.nn.functional.softplus(-fake_logits).mean(),
               "For the fakes use -log(1 - sigmoid(fake)) = softplus(fake), not -log sigmoid(fake) (that is G's loss)."),
              (lambda real_logits, fake_logits: torch.nn.functional.softplus(-real_logits).sum()
               + torch.nn.functional.softplus(fake_logits).sum(),
               "Average each term over its batch instead of summing."),
              (lambda real_logits, fake_logits: torch.nn.functional.softplus(-torch.cat([real_logits, fake_logits])).mean(),
               "The fakes need the opposite target: -log(1 - sigmoid(fake))."))))


# Lesson 5: fast sampling


def ref_dpmpp_2m_coefficients(sigma, sigma_next, sigma_prev):
    """(a, b, c) with x_next = a x + b D + c D_prev: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) as one fused pass."""
    h = math.log(sigma) - math.log(sigma_next)
    r = (math.log(sigma_prev) - math.log(sigma)) / h
    k = -math.expm1(-h)
    return torch.tensor([sigma_next / sigma, k * (1 + 1 / (2 * r)), -k / (2 * r)], dtype=torch.float64)


def _inputs_dpmpp(gen):
    s = float(torch.rand(1, generator=gen)) * 20 + 0.05
    return {"sigma": s, "sigma_next": s * (float(torch.rand(1, generator=gen)) * 0.8 + 0.1),
            "sigma_prev": s * (float(torch.rand(1, generator=gen)) * 3 + 1.1)}


register(Exercise(
    "dpmpp_2m_coefficients", 5, ref_dpmpp_2m_coefficients, _inputs_dpmpp,
    "With h = log(sigma / sigma_next) and r = log(sigma_prev / sigma) / h: x_next = (sigma_next / sigma) x - "
    "expm1(-h) ((1 + 1 / (2r)) D - D_prev / (2r)). Return the three numbers multiplying x, D and D_prev.",
    mistakes=((lambda sigma, sigma_next, sigma_prev: ref_dpmpp_2m_coefficients(sigma, sigma_next, sigma_prev)
               * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64),
               "-expm1(-h) = 1 - sigma_next / sigma is positive: the D terms add, weighted by it."),
              (lambda sigma, sigma_next, sigma_prev: torch.tensor(
                  [sigma_next / sigma, 1 - sigma_next / sigma, 0.0], dtype=torch.float64),
               "That is the first-order step (DDIM): add the correction with the previous D, weighted by 1 / (2r)."),
              (lambda sigma, sigma_next, sigma_prev: torch.tensor(
                  [sigma / sigma_next, 1 - sigma_next / sigma, 0.0], dtype=torch.float64),
               "x is scaled by sigma_next / sigma (< 1): the noise shrinks."),
              (lambda sigma, sigma_next, sigma_prev: ref_dpmpp_2m_coefficients(
                  sigma, sigma_next, sigma * math.exp((math.log(sigma) - math.log(sigma_next)) ** 2
                                                      / (math.log(sigma_prev) - math.log(sigma)))),
               "r is the previous step over this one, r = h_prev / h, not its inverse."))))


# ---- exercises graded on behaviour -------------------------------------------------------------------------------
# The learner's function runs inside a fixed procedure (course_lib.grading.harnesses: a short training run, or a
# sampling run with a counted budget) and the verdict comes from what it produced: the trained weights are loaded
# into a fresh network here and sampled or scored with the library's own code. Thresholds were calibrated on the
# reference solution and on the usual mistakes (tests/test_exercises.py runs both).

from .grading import harnesses as _H  # noqa: E402

TRAIN_HQ_FLOOR = 0.6  # the reference step reaches 0.86-0.96 in this budget; the usual mistakes stay below 0.1
SAMPLE_HQ_FLOOR = 0.7  # a plain Euler loop reaches 0.79 at worst over 200 random tasks (mean 0.89); one step: 0
ELBO_GAP = 2.0  # nats below the data's exact mean log-likelihood; the reference step is 0.8-1.4 below, mistakes > 3
MODE_SHARE = 0.4  # every mode must hold at least this share of its fair n / k samples


def _task_inputs(gen) -> dict:
    return {"seed": int(torch.randint(0, 2**31 - 1, (1,), generator=gen)),
            "k": int(torch.randint(4, 7, (1,), generator=gen)),
            "angle": round(float(torch.rand(1, generator=gen)) * 2 * math.pi, 4)}


def _losses_verdict(name: str, losses: torch.Tensor, changed: bool) -> CheckResult | None:
    """What went wrong with a training run, from its loss curve and whether the weights moved (None: nothing)."""
    if not torch.isfinite(losses).all():
        step = int((~torch.isfinite(losses)).nonzero()[0])
        return CheckResult(name, FAILED, f"the loss your step returned became {float(losses[step])} at step {step}.",
                           "Look for a division by a value that can be 0, or a log/sqrt of a negative number.")
    if not changed:
        return CheckResult(name, FAILED, "the network's weights never changed during training.",
                           "Each step: optimizer.zero_grad(), compute the loss, loss.backward(), optimizer.step().")
    first, last = float(losses[:50].mean()), float(losses[-200:].mean())
    if not last < 0.95 * first:
        return CheckResult(name, FAILED, f"the loss did not go down (mean {first:.3g} over the first 50 steps, "
                           f"{last:.3g} over the last 200).",
                           "Zero the gradients every step (optimizer.zero_grad()) before loss.backward(), then "
                           "optimizer.step(); and return the loss you minimised.")
    return None


def _trained_or_verdict(name: str, outputs: dict, net):
    """(the trained network, None), or (None, the verdict on what went wrong with the training run)."""
    got, why = _trained(outputs, net)
    if why:
        return None, CheckResult(name, FAILED, why + ".", "Train the network you are given in place; do not replace it.")
    net, changed = got
    return net, _losses_verdict(name, outputs.get("losses", torch.zeros(0)).double(), changed)


def _trained(outputs: dict, net):
    """Load the harness's returned weights into a fresh `net`; (net, weights changed?) or a message why not."""
    params = {k[len("param."):]: v for k, v in outputs.items() if k.startswith("param.")}
    init = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        net.load_state_dict(params, strict=True)
    except (RuntimeError, KeyError, TypeError) as e:
        return None, f"the trained network came back with different weights or shapes ({str(e)[:120]})"
    if not all(torch.isfinite(v).all() for v in params.values()):
        return None, "the trained network's weights contain NaN or infinity"
    changed = any(not torch.equal(init[k], params[k]) for k in init)
    return (net.eval(), changed), None


def ref_train_step(model, optimizer, x0, alpha_bar):
    """One step of DDPM training (Ho et al. 2020, Algorithm 1): uniform t, eps-prediction MSE, one optimizer step."""
    t = torch.randint(0, len(alpha_bar), (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    ab = _per_sample(alpha_bar[t], x0).to(x0.dtype)
    loss = ((noise - model(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t)) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def assess_train_step(inputs: dict, outputs: dict) -> CheckResult | None:
    """Lesson 2: the loss went down, and samples of the trained network (DDPM, every step) reach the quality floor."""
    from . import metrics
    from .samplers import sample
    from .schedules import NoiseSchedule

    name = "train_step"
    net, verdict = _trained_or_verdict(name, outputs, _H.denoiser_net(inputs["seed"]))
    if verdict:
        return verdict
    schedule = NoiseSchedule.named("cosine", _H.T_TRAIN)
    noise = torch.randn(_H.SAMPLE_POINTS, 2, generator=torch.Generator().manual_seed(inputs["seed"] + 3))
    mix = _H.task_mixture(inputs["k"], inputs["angle"])
    try:
        with torch.no_grad():
            x = sample(net, noise, schedule, "ddpm", timesteps=list(range(_H.T_TRAIN - 1, -1, -1)), clip=1.5,
                       generator=torch.Generator().manual_seed(inputs["seed"] + 4)).x
        hq, counts = metrics.hq_fraction(x, mix), metrics.mode_counts(x, mix)
    except FloatingPointError:
        hq, counts = 0.0, torch.zeros(inputs["k"])
    fair = MODE_SHARE * _H.SAMPLE_POINTS / inputs["k"]
    if hq >= TRAIN_HQ_FLOOR and bool((counts >= fair).all()):
        return None
    return CheckResult(name, FAILED, f"the loss went down, but samples from the trained network are poor: {hq:.0%} "
                       f"land near one of the {inputs['k']} modes (need {TRAIN_HQ_FLOOR:.0%}), and the emptiest mode "
                       f"holds {int(counts.min())} of {_H.SAMPLE_POINTS} (need {fair:.0f}).",
                       "The network must learn to predict the noise: draw t uniformly from 0 .. T-1 (one per "
                       "sample), x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, and minimise the mean squared error "
                       "between model(x_t, t) and that noise.")


def ref_sample_loop(denoise, x, sigmas):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), first order on the first and the last step: one denoiser
    call per step."""
    prev = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = denoise(x, s)
        if s_next == 0:
            return d
        h = math.log(s / s_next)
        if prev is None:
            dd = d
        else:
            r = math.log(float(sigmas[i - 1]) / s) / h
            dd = (1 + 1 / (2 * r)) * d - prev / (2 * r)
        x = (s_next / s) * x - math.expm1(-h) * dd
        prev = d
    return x


def assess_sample_loop(inputs: dict, outputs: dict) -> CheckResult | None:
    """Lesson 3: the samples reach the quality floor on the exact denoiser within the budget, every mode filled."""
    from . import metrics

    name = "sample_loop"
    x = outputs.get("samples")
    want = (_H.SAMPLE_POINTS, 2)
    if x is None or tuple(x.shape) != want:
        return CheckResult(name, FAILED, f"expected the final points, shape {want}, got "
                           f"{None if x is None else tuple(x.shape)}.", "Return x after the last step.")
    if not torch.isfinite(x).all():
        return CheckResult(name, FAILED, "the samples contain NaN or infinity.",
                           "Divide by sigma only while sigma > 0: the last step goes to sigma = 0.")
    mix = _H.task_mixture(inputs["k"], inputs["angle"])
    hq, counts = metrics.hq_fraction(x, mix), metrics.mode_counts(x, mix)
    fair = MODE_SHARE * _H.SAMPLE_POINTS / inputs["k"]
    if hq >= SAMPLE_HQ_FLOOR and bool((counts >= fair).all()):
        return None
    return CheckResult(name, FAILED, f"{hq:.0%} of your samples land near one of the {inputs['k']} modes (need "
                       f"{SAMPLE_HQ_FLOOR:.0%}), and the emptiest mode holds {int(counts.min())} of "
                       f"{_H.SAMPLE_POINTS} (need {fair:.0f}); {int(outputs['calls'])} denoiser calls for "
                       f"{inputs['nfe']} steps.",
                       "Step through every pair (sigma, sigma_next): the Euler step is x + (sigma_next - sigma) "
                       "(x - denoise(x, sigma)) / sigma, and the last step (to sigma = 0) lands on denoise(x, sigma).")


def _inputs_sample_loop(gen) -> dict:
    return {**_task_inputs(gen), "sigma_max": round(10 + 20 * float(torch.rand(1, generator=gen)), 3),
            "sigma_min": round(0.01 + 0.04 * float(torch.rand(1, generator=gen)), 4), "rho": 7.0,
            "nfe": int(torch.randint(8, 11, (1,), generator=gen))}


def ref_vae_step(vae, optimizer, x):
    """One step on the negative ELBO (Kingma & Welling 2014, eq. 3 and 10): reparameterised z, Gaussian decoder
    log-likelihood with its learned scale, KL to N(0, I)."""
    mu, logvar = vae.encode(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    mean, log_scale = vae.decode(z)
    nll = (0.5 * ((x - mean) / log_scale.exp()) ** 2 + log_scale + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    loss = (nll + kl).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def assess_vae_step(inputs: dict, outputs: dict) -> CheckResult | None:
    """Lesson 4: the loss went down and the trained VAE's held-out ELBO is within ELBO_GAP nats of the data's exact
    log-likelihood (the ELBO is measured here, with course_lib.vae.elbo, not from the learner's loss)."""
    from .vae import elbo

    name = "vae_step"
    vae, verdict = _trained_or_verdict(name, outputs, _H.vae_net(inputs["seed"]))
    if verdict:
        return verdict
    mix = _H.task_mixture(inputs["k"], inputs["angle"])
    x = mix.sample(4000, torch.Generator().manual_seed(inputs["seed"] + 9))
    with torch.no_grad():
        e = elbo(vae, x, n_z=8, generator=torch.Generator().manual_seed(inputs["seed"] + 10))
    bound, exact = float(e["elbo"].mean()), float(mix.log_prob(x).mean())
    if bound >= exact - ELBO_GAP:
        return None
    return CheckResult(name, FAILED, f"the trained VAE's held-out ELBO is {bound:.3g} nats per point; the data's exact "
                       f"log-likelihood is {exact:.3g}, and a correct step gets within {ELBO_GAP:g} of it "
                       f"(KL {float(e['kl'].mean()):.3g} nats).",
                       "Minimise the negative ELBO: z = mu + exp(logvar / 2) * noise; the decoder's Gaussian "
                       "negative log-likelihood 0.5 ((x - mean) / exp(log_scale))^2 + log_scale + 0.5 log(2 pi), "
                       "summed over dimensions, plus the KL 0.5 (mu^2 + exp(logvar) - 1 - logvar) summed over latents.")


def _step_forgetting(forget: str):
    """The reference training step with one usual mistake (for the tests and the hints)."""
    def step(model, optimizer, x0, alpha_bar):
        t = torch.randint(0, len(alpha_bar), (x0.shape[0],))
        noise = torch.randn_like(x0)
        ab = _per_sample(alpha_bar[t], x0).to(x0.dtype)
        target = x0 if forget == "eps target" else noise
        loss = ((target - model(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t)) ** 2).mean()
        if forget != "zero_grad":
            optimizer.zero_grad()
        loss.backward()
        if forget != "step":
            optimizer.step()
        return loss.detach()
    return step


def _vae_step_forgetting(forget: str):
    """The reference VAE step with one usual mistake."""
    def step(vae, optimizer, x):
        mu, logvar = vae.encode(x)
        z = mu + (logvar if forget == "std" else torch.exp(0.5 * logvar)) * torch.randn_like(mu)
        mean, log_scale = vae.decode(z)
        nll = (0.5 * ((x - mean) / log_scale.exp()) ** 2 + log_scale).sum(1)
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
        loss = (nll + (0 if forget == "kl" else kl)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def _one_shot_loop(denoise, x, sigmas):
    return denoise(x, float(sigmas[0]))


def _heun_loop(denoise, x, sigmas):
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (x - denoise(x, s)) / s
        x_euler = x + (s_next - s) * d
        x = x_euler if s_next == 0 else x + (s_next - s) * (d + (x_euler - denoise(x_euler, s_next)) / s_next) / 2
    return x


register(Exercise(
    "train_step", 2, ref_train_step, _task_inputs,
    "One training step: draw t and the noise, noise x0 to x_t, take the mean squared error between model(x_t, t) "
    "and the noise, then zero_grad, backward, step. Return the loss.",
    mistakes=((_step_forgetting("step"), "optimizer.step()"), (_step_forgetting("zero_grad"), "zero_grad"),
              (_step_forgetting("eps target"), "predict the noise")),
    trials=1, harness="train_diffusion", assess=assess_train_step, seconds=120.0,
    passed_message=f"{_H.TRAIN_STEPS} of your steps trained a network whose samples cover every mode of a fresh "
                   f"mixture with at least {TRAIN_HQ_FLOOR:.0%} of them near a mode."))
register(Exercise(
    "sample_loop", 3, ref_sample_loop, _inputs_sample_loop,
    "A whole sampler: for each pair (sigma, sigma_next) call denoise once and move x towards sigma_next "
    "(Euler / DDIM, or DPM-Solver++(2M)); return x at sigma = 0. Heun's two calls per step exceed the budget.",
    mistakes=((_one_shot_loop, "Step through every pair"), (_heun_loop, "BudgetExceeded")),
    trials=2, harness="sample_with_loop", assess=assess_sample_loop, seconds=60.0,
    passed_message=f"within the budget of one denoiser call per step, your samples of two fresh mixtures fill "
                   f"every mode with at least {SAMPLE_HQ_FLOOR:.0%} of them near a mode."))
register(Exercise(
    "vae_step", 4, ref_vae_step, _task_inputs,
    "One step on the negative ELBO: encode, reparameterise, decode, Gaussian negative log-likelihood plus KL, "
    "then zero_grad, backward, step. Return the loss.",
    mistakes=((_vae_step_forgetting("kl"), "plus the KL"), (_vae_step_forgetting("std"), "exp(logvar / 2)")),
    trials=1, harness="train_vae", assess=assess_vae_step, seconds=120.0,
    passed_message=f"{_H.TRAIN_STEPS} of your steps trained a VAE whose held-out ELBO is within {ELBO_GAP:g} nats "
                   f"of the data's exact log-likelihood."))
LIBRARY_EQUIVALENTS.update({
    "train_step": ("course_lib.losses.diffusion_loss", "course_lib.train.Trainer.train_step"),
    "sample_loop": ("course_lib.samplers.sample", "course_lib.samplers.sample_euler", "course_lib.samplers.sample_ddim",
                    "course_lib.samplers.sample_dpmpp_2m", "course_lib.samplers.sample_heun",
                    "course_lib.samplers.sample_euler_ancestral", "course_lib.samplers.sample_dpmpp_2m_sde",
                    "course_lib.kernels.ddim_step", "course_lib.kernels.euler_step", "course_lib.kernels.dpmpp_2m_step"),
    "vae_step": ("course_lib.vae.elbo", "course_lib.train.Trainer.train_step"),
})
