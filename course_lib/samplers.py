"""Samplers: turn noise into data with a trained model, through one interface.

Every sampler is one function `sample_x(denoiser, x, sigmas, ...)` in the continuous view of Karras et al. 2022
(EDM): x = x0 + sigma * eps, sigma running down an explicit decreasing list that ends at 0 (the data). A network
trained in the discrete alpha-bar view (eps, x0 or v prediction) becomes such a denoiser through
`as_denoiser`; x_t = sqrt(ab) x0 + sqrt(1 - ab) eps is the same point scaled by sqrt(ab), with
sigma = sqrt((1 - ab) / ab). `sample()` is the front door: model, noise, steps (or timesteps, or sigmas), sampler.
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass

import torch

from . import kernels
from .losses import convert, posterior_coefficients
from .schedules import NoiseSchedule
from .step_schedules import (  # noqa: F401
    SPACINGS,
    _check_steps,
    check_sigmas,
    check_timesteps,
    default_sigmas,
    get_sigmas,
    karras_sigmas,
    leading_timesteps,
    recommended_sampler,
    sigmas_from_timesteps,
    time_sigmas,
    trailing_timesteps,
    tuned_karras,
    uniform_timesteps,
)

# ---------------------------------------------------------------------------------------------------------------
# Models as denoisers D(x, sigma)


class Denoiser:
    """A model seen as D(x, sigma) = E[x0 | x0 + sigma eps = x] (Karras et al. 2022, eq. 2-3); counts its calls in .nfe.

    `fn(x, sigma, **kwargs)` takes x in the sigma view and a float sigma > 0. sigma_min / sigma_max give the range
    the model knows (used to build step spacings); clip clamps the x0 estimate (images in [-1, 1]). `path` says how
    the model was trained to see noise: 'vp' (x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, diffusion) or 'linear'
    (x_t = (1 - t) x0 + t eps, flow matching); it sets the prior the samplers start from (`prior_std`).
    """

    PATHS = ("vp", "linear")

    def __init__(self, fn, sigma_min: float = 0.002, sigma_max: float = 80.0, clip: float | None = None,
                 schedule: NoiseSchedule | None = None, sampling: dict | None = None, path: str = "vp",
                 recommended: dict | None = None):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        if path not in self.PATHS:
            raise ValueError(f"path must be one of {self.PATHS}, got {path!r}")
        self.fn, self.sigma_min, self.sigma_max, self.clip, self.schedule = fn, float(sigma_min), float(sigma_max), clip, schedule
        self.sampling = sampling  # tuned noise levels per sampler and budget (course_lib.step_schedules)
        self.recommended = recommended  # {budget: sampler} from the card: what `sample` uses when none is named
        self.path = path
        self.nfe = 0

    def prior_std(self, sigma: float) -> float:
        """The std of x at noise level sigma when x_t is pure standard noise: sqrt(1 + sigma^2) for 'vp' (x_T ~ N(0, I)
        and x = x_T / sqrt(ab)), 1 + sigma for 'linear' (x = x_1 / (1 - t))."""
        sigma = float(sigma)
        return math.sqrt(1 + sigma * sigma) if self.path == "vp" else 1 + sigma

    def __call__(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        sigma = float(sigma)
        if not sigma > 0:
            raise ValueError(f"a denoiser needs sigma > 0, got {sigma}")
        self.nfe += 1
        x0 = self.fn(x, sigma, **kwargs)
        if x0.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(x0.shape)} for an input of shape {tuple(x.shape)}")
        return x0.clamp(-self.clip, self.clip) if self.clip is not None else x0


def sigma_to_t(schedule: NoiseSchedule, sigma: float) -> float:
    """The (possibly fractional) timestep whose sigma is `sigma`, interpolating log-sigma (as k-diffusion and diffusers do).

    Outside the schedule's range it is clamped to 0 or T-1."""
    log_sigmas = schedule.sigmas.log()
    ls = math.log(sigma)
    if ls <= log_sigmas[0]:
        return 0.0
    if ls >= log_sigmas[-1]:
        return float(schedule.T - 1)
    hi = int(torch.searchsorted(log_sigmas, torch.tensor(ls, dtype=log_sigmas.dtype)))
    lo = hi - 1
    w = (ls - float(log_sigmas[lo])) / float(log_sigmas[hi] - log_sigmas[lo])
    return lo + w


def timesteps_for_sigma(schedule: NoiseSchedule, sigma: float, x: torch.Tensor) -> torch.Tensor:
    """The (B,) timesteps a network trained on `schedule` gets for noise level sigma: integers on the grid (as in
    training), fractional between grid points (sigma_to_t)."""
    t = sigma_to_t(schedule, sigma)
    t = round(t) if abs(t - round(t)) < 1e-6 else t
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long if isinstance(t, int) else torch.float32)


# A flow-matching network (course_lib.flow, lesson 9) sees t * FLOW_TIME_SCALE, the diffusion networks' range of steps;
# its denoiser reports t from FLOW_T_RANGE[0] to FLOW_T_RANGE[1]: sigma from 0.002 to about 1e5 (t = 1 itself would be
# sigma = infinity; at 1 - 1e-5 the network input differs from t = 1 by 0.01 of a step)
FLOW_TIME_SCALE = 1000.0
FLOW_T_RANGE = (0.002 / 1.002, 1 - 1e-5)


def velocity_denoiser(model, clip: float | None = None):
    """A velocity model v(x_t, t) as the samplers' denoiser D(x, sigma): t = sigma / (1 + sigma), x_t = x (1 - t),
    x0 = x_t - t v. Its prior is N(0, (1 + sigma)^2 I): x_t = noise at t = 1."""
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")

    lo, hi = FLOW_T_RANGE

    def fn(x, sigma, **kwargs):
        t = sigma / (1 + sigma)
        x_t = x * (1 - t)
        v = model(x_t, torch.full((x.shape[0],), t * FLOW_TIME_SCALE, dtype=torch.float32, device=x.device), **kwargs)
        return x_t - t * v.to(x.dtype)

    return Denoiser(fn, lo / (1 - lo), hi / (1 - hi), clip, None, getattr(model, "sampling", None),
                    path="linear", recommended=getattr(model, "recommended_sampler", None))


def as_denoiser(model, schedule: NoiseSchedule | None = None, prediction: str | None = None,
                clip: float | None = None) -> Denoiser:
    """Wrap a model as D(x, sigma): a Denoiser is returned as is (or re-wrapped with clip); an eps / x0 / v model needs
    its schedule; a flow-matching velocity model (prediction 'flow') needs none (velocity_denoiser, lesson 9)."""
    if isinstance(model, Denoiser):
        return model if clip is None else Denoiser(model.fn, model.sigma_min, model.sigma_max, clip, model.schedule,
                                                   model.sampling, model.path, model.recommended)
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    prediction = prediction or getattr(model, "prediction", None)
    if prediction == "flow":  # a flow-matching velocity model (course_lib.flow): no noise schedule needed
        return velocity_denoiser(model, clip)
    if prediction == "edm":  # a preconditioned network is a denoiser already (nets.EDMPrecond, lesson 11)
        return Denoiser(lambda x, sigma, **kw: model(x, sigma, **kw), model.sigma_min, model.sigma_max, clip, None,
                        getattr(model, "sampling", None), recommended=getattr(model, "recommended_sampler", None))
    if prediction not in ("eps", "x0", "v"):
        raise ValueError(f"pass prediction='eps', 'x0', 'v', 'flow' or 'edm' (the model does not declare one), got {prediction!r}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"an {prediction}-predicting model needs its NoiseSchedule, got {type(schedule).__name__}")

    def fn(x, sigma, **kwargs):
        ab = 1.0 / (1.0 + sigma * sigma)
        x_t = x * math.sqrt(ab)  # the same point in the alpha-bar view
        out = model(x_t, timesteps_for_sigma(schedule, sigma, x), **kwargs)
        # torch.full, not torch.tensor: a fill kernel, not a host-to-device copy, so the loop can be a CUDA graph
        return convert(out, prediction, "x0", x_t, torch.full((), ab, dtype=x.dtype, device=x.device))

    sig = schedule.sigmas
    return Denoiser(fn, float(sig[0]), float(sig[-1]), clip, schedule, getattr(model, "sampling", None),
                    recommended=getattr(model, "recommended_sampler", None))


def as_model(denoiser: Denoiser, schedule: NoiseSchedule, prediction: str = "eps"):
    """The other direction: a D(x, sigma) seen as an eps / x0 / v model(x_t, t) on a discrete schedule."""

    def model(x_t, t, **kwargs):
        t = torch.as_tensor(t).flatten()
        if t.numel() != 1 and not (t == t[0]).all():
            raise ValueError("as_model needs one timestep for the whole batch")
        ab = schedule.alpha_bar[int(t[0])]
        sigma = float(((1 - ab) / ab).sqrt())
        x0 = denoiser(x_t / ab.sqrt().to(x_t.dtype), sigma, **kwargs)
        return convert(x0, "x0", prediction, x_t, ab.to(x_t.dtype))

    model.prediction = prediction
    return model


# ---------------------------------------------------------------------------------------------------------------
# The samplers. Each: (denoiser, x at sigmas[0], sigmas, ...) -> x at sigmas[-1]; with return_trajectory also
# every intermediate state, shown in the alpha-bar view x / sqrt(1 + sigma^2) so that all samplers share one picture.


def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _steps(sigmas: torch.Tensor, progress: bool, desc: str):
    """(i, sigma_i, sigma_{i+1}) as floats for every step, behind a progress bar if asked."""
    steps = range(len(sigmas) - 1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=desc, leave=False)
    for i in steps:
        yield i, float(sigmas[i]), float(sigmas[i + 1])


class _Trajectory:
    def __init__(self, on: bool, x, sigma):
        self.states = [] if on else None
        self.add(x, sigma)

    def add(self, x, sigma):
        if self.states is not None:
            self.states.append((x / math.sqrt(1 + float(sigma) ** 2)).cpu())

    def result(self, x):
        return (x, torch.stack(self.states)) if self.states is not None else x


def _ab(sigma: float) -> float:
    return 1.0 / (1.0 + sigma * sigma)


def ancestral_step(x, x0, s: float, s_next: float, variance: str = "beta", generator=None):
    """One DDPM step from level s to s_next given the estimate x0: a draw of q(x_s | x_t, x0) (Ho et al. 2020, eq. 7)
    with the variance 'beta' (beta_{t|s} = 1 - ab_t / ab_s) or 'posterior' (beta-tilde), in the sigma view; to 0, x0."""
    if s_next == 0:
        return x0
    ab_t, ab_s = torch.tensor(_ab(s), dtype=torch.float64), torch.tensor(_ab(s_next), dtype=torch.float64)
    c_x0, c_xt, var = (float(c) for c in posterior_coefficients(ab_t, ab_s))
    if variance == "beta":
        var = 1 - _ab(s) / _ab(s_next)
    x_s = c_x0 * x0 + c_xt * x * math.sqrt(_ab(s)) + math.sqrt(var) * _noise(x, generator)
    return x_s / math.sqrt(_ab(s_next))


@torch.no_grad()
def sample_ancestral(denoiser, x, sigmas, variance: str = "beta", generator=None, progress=False,
                     return_trajectory=False, **model_kwargs):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) between any decreasing noise levels.

    Each step draws x_s ~ q(x_s | x_t, x0 = D(x_t)); 'beta' uses the variance beta_{t|s} = 1 - ab_t / ab_s,
    'posterior' the true posterior's beta-tilde (eq. 7). The step to sigma = 0 returns D(x).
    """
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
    sigmas = check_sigmas(sigmas)
    traj = _Trajectory(return_trajectory, x, sigmas[0])
    for i, s, s_next in _steps(sigmas, progress, "DDPM"):
        x = ancestral_step(x, denoiser(x, s, **model_kwargs), s, s_next, variance, generator)
        traj.add(x, s_next)
    return traj.result(x)


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, eta: float = 0.0, generator=None, progress=False, return_trajectory=False,
                **model_kwargs):
    """DDIM (Song, Meng & Ermon 2021, eq. 12): eta = 0 is deterministic, eta = 1 is DDPM with beta-tilde."""
    if not 0 <= eta:
        raise ValueError(f"eta must be >= 0, got {eta}")
    sigmas = check_sigmas(sigmas)
    traj = _Trajectory(return_trajectory, x, sigmas[0])
    for i, s, s_next in _steps(sigmas, progress, "DDIM"):
        x0 = denoiser(x, s, **model_kwargs)
        if eta == 0:  # one fused pass on a GPU (course_lib.kernels)
            x = kernels.ddim_step(x, x0, s, s_next)
            traj.add(x, s_next)
            continue
        ab_t, ab_s = _ab(s), _ab(s_next)
        x_t = x * math.sqrt(ab_t)
        eps = (x_t - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        std = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        x_s = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - std**2, 0.0)) * eps
        if std > 0:
            x_s = x_s + std * _noise(x, generator)
        x = x_s / math.sqrt(ab_s)
        traj.add(x, s_next)
    return traj.result(x)


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, progress=False, return_trajectory=False, **model_kwargs):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 4)."""
    sigmas = check_sigmas(sigmas)
    traj = _Trajectory(return_trajectory, x, sigmas[0])
    for i, s, s_next in _steps(sigmas, progress, "Euler"):
        x = kernels.euler_step(x, denoiser(x, s, **model_kwargs), s, s_next)
        traj.add(x, s_next)
    return traj.result(x)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                s_noise: float = 1.0, integrate_in: str = "auto", generator=None, progress=False,
                return_trajectory=False, **model_kwargs):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1; with s_churn > 0 the stochastic Algorithm 2).

    The last step, to sigma = 0, is an Euler step (a second evaluation at sigma = 0 is undefined), so n steps
    cost 2n - 1 model evaluations. integrate_in='auto' averages the slopes in sigma for diffusion (EDM's choice) and in
    a flow model's own time t = sigma / (1 + sigma) for a flow (denoiser.path 'linear'; kernels.heun_correct_linear):
    from a flow's first level, sigma = 1e5, the trapezoid in sigma is badly conditioned (lesson 9 measures it).
    """
    if integrate_in not in ("auto", "sigma", "t"):
        raise ValueError(f"integrate_in must be 'auto', 'sigma' or 't', got {integrate_in!r}")
    sigmas = check_sigmas(sigmas)
    if integrate_in == "auto":
        integrate_in = "t" if getattr(denoiser, "path", "vp") == "linear" else "sigma"
    correct = kernels.heun_correct_linear if integrate_in == "t" else kernels.heun_correct
    n = len(sigmas) - 1
    traj = _Trajectory(return_trajectory, x, sigmas[0])
    for i, s, s_next in _steps(sigmas, progress, "Heun"):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:  # Algorithm 2, lines 5-6: add noise to move up to s_hat
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * _noise(x, generator)
        denoised = denoiser(x, s_hat, **model_kwargs)
        x_next = kernels.euler_step(x, denoised, s_hat, s_next)
        if s_next > 0:  # the correction: average the slopes at both ends
            x_next = correct(x, denoised, x_next, denoiser(x_next, s_next, **model_kwargs), s_hat, s_next)
        x = x_next
        traj.add(x, s_next)
    return traj.result(x)


R_MIN = 0.5  # the multistep correction weighs D - D_prev by 1 / (2r): below this step ratio it amplifies error


def _second_order_ok(sigmas: torch.Tensor, i: int, r: float) -> bool:
    """Whether step i (sigmas[i] -> sigmas[i+1] > 0) may use the multistep correction: not when the previous step
    was much shorter than this one (r = h_prev / h < R_MIN), and not on the last step before sigma = 0 (as
    diffusers' lower_order_final), where the jump down to the smallest noise level is usually the largest."""
    return r >= R_MIN and not (i == len(sigmas) - 3 and float(sigmas[-1]) == 0)


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, stable: bool = True, progress=False, return_trajectory=False, **model_kwargs):
    """DPM-Solver++(2M), the multistep 2nd-order data-prediction solver (Lu et al. 2022, Algorithm 2).

    With lambda = -log sigma and h the step in lambda, it reuses the previous D to extrapolate. The first step,
    the final step to sigma = 0, the step before it, and any step more than twice as long as the one before are
    first order (= DDIM): with r = h_prev / h the extrapolation weighs D - D_prev by 1 / (2r), which on a uniform
    10-step schedule reaches 20 at the end and throws the samples away (lesson 3 shows it). stable=False is the
    plain Algorithm 2 (as k-diffusion and diffusers' DPMSolverMultistepScheduler), second order whenever it can be.
    """
    sigmas = check_sigmas(sigmas)
    traj = _Trajectory(return_trajectory, x, sigmas[0])
    old = None
    for i, s, s_next in _steps(sigmas, progress, "DPM-Solver++(2M)"):
        x0 = denoiser(x, s, **model_kwargs)
        if s_next == 0:
            x = x0
        else:  # with h = log(s / s_next) and r = h_last / h (see kernels.dpmpp_2m_step)
            use = old is not None and (not stable or _second_order_ok(
                sigmas, i, math.log(float(sigmas[i - 1]) / s) / math.log(s / s_next)))
            x = kernels.dpmpp_2m_step(x, x0, old if use else None, s, s_next, float(sigmas[i - 1]) if use else None)
        old = x0
        traj.add(x, s_next)
    return traj.result(x)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, eta: float = 1.0, generator=None, progress=False,
                        return_trajectory=False, **model_kwargs):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, 'DPM-Solver++', sec. 5 and app. B): the data-prediction solver of the
    reverse SDE, exact for its linear part, with DPM-Solver++(2M)'s multistep correction.

    With h = log(sigma / sigma_next): x' = (sigma_next / sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) D
    + sigma_next sqrt(1 - e^{-2 eta h}) z. eta = 0 is the ODE solver (DPM-Solver++(2M)), eta = 1 the reverse SDE.
    The correction is skipped where the step ratio would make it unstable (see sample_dpmpp_2m)."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    sigmas = check_sigmas(sigmas)
    traj = _Trajectory(return_trajectory, x, sigmas[0])
    old, h_last = None, None
    for i, s, s_next in _steps(sigmas, progress, "DPM-Solver++(2M) SDE"):
        x0 = denoiser(x, s, **model_kwargs)
        if s_next == 0:
            x = x0
        else:
            h = math.log(s / s_next)
            k = -math.expm1(-(1 + eta) * h)
            x = (s_next / s) * math.exp(-eta * h) * x + k * x0
            if old is not None and _second_order_ok(sigmas, i, h_last / h):
                x = x + k / (2 * h_last / h) * (x0 - old)
            if eta > 0:
                x = x + s_next * math.sqrt(-math.expm1(-2 * eta * h)) * _noise(x, generator)
            h_last = h
        old = x0
        traj.add(x, s_next)
    return traj.result(x)


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, eta: float = 1.0, generator=None, progress=False,
                        return_trajectory=False, **model_kwargs):
    """SDE-DPM-Solver++(3M) (Lu et al. 2022, 'DPM-Solver++', sec. 4-5; the third-order multistep form of
    k-diffusion's sample_dpmpp_3m_sde): the update of sample_dpmpp_2m_sde, corrected with the first and second
    divided differences of the last three D's (phi_2 = (e^{-h'} - 1)/h' + 1, phi_3 = phi_2/h' - 1/2, h' = (1+eta) h).

    eta = 0 is the third-order ODE solver. Lower orders where there is no history yet, where a step ratio makes the
    extrapolation unstable (R_MIN) and on the last step before sigma = 0 (as diffusers' lower_order_final)."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    sigmas = check_sigmas(sigmas)
    traj = _Trajectory(return_trajectory, x, sigmas[0])
    d_1 = d_2 = h_1 = h_2 = None  # the last two D's and steps
    for i, s, s_next in _steps(sigmas, progress, "DPM-Solver++(3M) SDE"):
        x0 = denoiser(x, s, **model_kwargs)
        if s_next == 0:
            x = x0
        else:
            h = math.log(s / s_next)
            h_eta = h * (1 + eta)
            x = (s_next / s) * math.exp(-eta * h) * x - math.expm1(-h_eta) * x0
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            second = d_1 is not None and _second_order_ok(sigmas, i, h_1 / h)
            if second and d_2 is not None and h_2 / h_1 >= R_MIN:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (x0 - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif second:
                x = x + phi_2 * (x0 - d_1) / (h_1 / h)
            if eta > 0:
                x = x + s_next * math.sqrt(-math.expm1(-2 * eta * h)) * _noise(x, generator)
            h_1, h_2 = h, h_1
        d_1, d_2 = x0, d_1
        traj.add(x, s_next)
    return traj.result(x)


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, eta: float = 1.0, generator=None, progress=False,
                           return_trajectory=False, **model_kwargs):
    """Euler ancestral (k-diffusion): an Euler step down to sigma_down, then fresh noise of size sigma_up."""
    sigmas = check_sigmas(sigmas)
    traj = _Trajectory(return_trajectory, x, sigmas[0])
    for i, s, s_next in _steps(sigmas, progress, "Euler ancestral"):
        up = min(s_next, eta * math.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0)))
        down = math.sqrt(s_next**2 - up**2)
        x = kernels.euler_step(x, denoiser(x, s, **model_kwargs), s, down)  # x + (down - s)(x - D) / s
        if up > 0:
            x = x + up * _noise(x, generator)
        traj.add(x, s_next)
    return traj.result(x)


@torch.no_grad()
def sample_consistency(denoiser, x, sigmas, sigma_min: float = 0.002, generator=None, progress=False,
                       return_trajectory=False, **model_kwargs):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1), for a consistency model (lesson 12): map x to
    data at the first level; at each next level tau > 0, noise the estimate back up, x0 + sqrt(tau^2 - sigma_min^2) z,
    and map again. One evaluation per level above 0 (a final 0 adds none: the estimate is already data)."""
    # f is defined down to sigma_min, where it is the identity: a level below it (a tuner may try one) is sigma_min
    levels = [max(float(v), sigma_min) for v in check_sigmas(sigmas) if v > 0]
    traj = _Trajectory(return_trajectory, x, levels[0])
    x0 = denoiser(x, levels[0], **model_kwargs)
    traj.add(x0, 0.0)
    later = levels[1:]
    if progress:
        from tqdm.auto import tqdm
        later = tqdm(later, desc="consistency", leave=False)
    for s in later:  # a fresh noisy point at level s around the last estimate, mapped again
        x0 = denoiser(x0 + math.sqrt(max(s * s - sigma_min * sigma_min, 0.0)) * _noise(x0, generator), s, **model_kwargs)
        traj.add(x0, 0.0)
    return traj.result(x0)


SAMPLERS = {
    "ddpm": sample_ancestral,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "euler_ancestral": sample_euler_ancestral,
    "consistency": sample_consistency,
}


def nfe_for_steps(sampler: str, steps: int) -> int:
    """Model evaluations a sampler spends on `steps` steps ending at sigma = 0 (Heun: 2 per step but the last)."""
    _check_sampler(sampler)
    return 2 * steps - 1 if sampler == "heun" else steps


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """The most steps whose cost is at most `nfe` model evaluations."""
    _check_sampler(sampler)
    return max((nfe + 1) // 2, 1) if sampler == "heun" else nfe


def _check_sampler(name) -> str:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    return name


@dataclass
class SampleResult:
    """What `sample` returns: the samples, the model evaluations it counted, the noise levels, the wall time."""

    x: torch.Tensor
    nfe: int
    sigmas: torch.Tensor
    seconds: float
    trajectory: torch.Tensor | None = None
    spacing: str = ""  # which noise levels were used, in words


def sample(model, noise: torch.Tensor, schedule: NoiseSchedule | None = None, sampler: str | None = None,
           steps: int | None = None, spacing: str = "auto", sigmas=None, timesteps=None,
           prediction: str | None = None, clip: float | None = None, generator: torch.Generator | None = None,
           progress: bool = False, return_trajectory: bool = False, model_kwargs: dict | None = None,
           **options) -> SampleResult:
    """Sample from any model with any sampler: give exactly one of steps (+ spacing), timesteps or sigmas.

    sampler=None (the default) is the sampler the model's card recommends at the nearest tuned budget (chosen by
    `python -m course_lib tune` on tuning noise: lesson 3), else 'dpmpp_2m'.

    spacing='auto' (the default) uses the model's tuned Karras noise levels for this sampler and budget when it has
    them (every shipped checkpoint does, `load_pretrained` attaches them), else Karras spacing over the model's whole
    noise range (a flow model: uniform in t); 'uniform', 'leading', 'trailing' and 'karras' are the standard spacings. `noise` is standard normal; it is scaled to the model's prior std at the first level (sqrt(1 + sigma^2) for
    diffusion, which is exactly x_T = noise in the alpha-bar view; 1 + sigma for a flow model), so the same noise gives comparable samples through every sampler. Options (variance, eta,
    s_churn, ...) go to the sampler; model_kwargs (e.g. y=labels) to the model.
    """
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point torch.Tensor, got {type(noise).__name__}")
    if sum(v is not None for v in (steps, sigmas, timesteps)) != 1:
        raise ValueError("give exactly one of steps=, timesteps= or sigmas=")
    den = as_denoiser(model, schedule, prediction, clip)
    if sampler is None:  # the model card's choice at the nearest budget, else DPM-Solver++(2M)
        budget = steps if steps is not None else (torch.as_tensor(timesteps).numel() if timesteps is not None
                                                  else torch.as_tensor(sigmas).numel() - 1)
        sampler = recommended_sampler(den.recommended, budget if isinstance(budget, int) and budget > 0 else 10)
    fn = SAMPLERS[_check_sampler(sampler)]
    schedule = schedule or den.schedule
    how = "given"
    if steps is not None:
        untuned_flow = den.path == "linear" and tuned_karras(den.sampling, sampler,
                                                             nfe_for_steps(sampler, _check_steps(steps))) is None
        if spacing == "auto" and not untuned_flow:
            sig, how = default_sigmas(_check_steps(steps), nfe_for_steps(sampler, steps), sampler, schedule,
                                      den.sigma_min, den.sigma_max, den.sampling)
        elif spacing in ("auto", "uniform") and schedule is None and den.path == "linear":  # a flow model: uniform in t
            # (lesson 9: for an untuned flow model far better than Karras levels over its range, which reaches 1e5)
            sig, how = time_sigmas(_check_steps(steps), FLOW_T_RANGE[1]), "uniform in t"
        else:
            most = schedule.T if schedule is not None and spacing != "karras" else None
            sig, how = get_sigmas(_check_steps(steps, most), spacing, schedule, den.sigma_min, den.sigma_max), spacing
    elif timesteps is not None:
        if schedule is None:
            raise ValueError("timesteps= needs the model's NoiseSchedule; pass sigmas= for a plain denoiser")
        sig = sigmas_from_timesteps(schedule, timesteps)
    else:
        sig = check_sigmas(sigmas)
    unexpected = set(options) - set(inspect.signature(fn).parameters)
    if unexpected:
        raise TypeError(f"sampler {sampler!r} has no option(s) {sorted(unexpected)}")
    if "generator" in inspect.signature(fn).parameters:
        options["generator"] = generator
    x = noise * den.prior_std(sig[0])
    start, nfe0 = time.perf_counter(), den.nfe
    out = fn(den, x, sig, progress=progress, return_trajectory=return_trajectory, **options, **(model_kwargs or {}))
    x, traj = out if return_trajectory else (out, None)
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{sampler} produced {int((~torch.isfinite(x)).sum())} non-finite values; "
                                 "check the model and the noise levels")
    return SampleResult(x, den.nfe - nfe0, sig, time.perf_counter() - start, traj, how)


def sample_ddpm(model, x: torch.Tensor, schedule: NoiseSchedule, timesteps=None, prediction: str | None = None,
                variance: str = "beta", clip: float | None = None, generator: torch.Generator | None = None,
                progress: bool = False, return_trajectory: bool = False, **model_kwargs):
    """DDPM ancestral sampling in the timestep view (Ho et al. 2020, Algorithm 2), all T steps by default.

    The same as sample(model, x, schedule, 'ddpm', timesteps=...), returning the samples (and trajectory).
    """
    res = sample(model, x, schedule, "ddpm", timesteps=check_timesteps(timesteps, schedule), prediction=prediction,
                 clip=clip, generator=generator, progress=progress, return_trajectory=return_trajectory,
                 model_kwargs=model_kwargs, variance=variance)
    return (res.x, res.trajectory) if return_trajectory else res.x
