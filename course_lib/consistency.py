"""Few-step generation (lesson 12): consistency models (Song et al. 2023; Song & Dhariwal 2023) and progressive
distillation (Salimans & Ho 2022), in the samplers' sigma view x = x0 + sigma n.

A consistency function f(x, sigma) maps every point of a probability-flow ODE trajectory to the trajectory's end at
sigma_min; it is built so that f(x, sigma_min) = x (the boundary condition) and trained so that two neighbouring points
of one trajectory give the same answer (self-consistency)."""
from __future__ import annotations

import math

import torch

from .flow import pseudo_huber

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SIGMA_DATA = 0.5
RHO = 7.0
DISTANCES = ("l2", "pseudo_huber")
SOLVERS = ("euler", "heun")


def _rows(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a tensor broadcastable against x: one number, or one per row."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be one number or one per row ({x.shape[0]},), got shape {tuple(s.shape)}")
    return s.reshape((-1,) + (1,) * (x.ndim - 1))


def boundary_coefficients(sigma, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
    """(c_skip, c_out) with c_skip(sigma_min) = 1 and c_out(sigma_min) = 0, so f = c_skip x + c_out D is x at sigma_min
    (Song et al. 2023, Appendix C, on a denoiser's output as latent consistency models use it: c_out -> 1 at large
    sigma, where f is the denoiser's estimate)."""
    s = torch.as_tensor(sigma, dtype=torch.float64) - sigma_min
    if bool((s < -1e-12).any()):
        raise ValueError(f"a consistency function is defined for sigma >= sigma_min = {sigma_min}")
    total = s * s + sigma_data * sigma_data
    return sigma_data * sigma_data / total, s / total.sqrt()


def consistency_output(denoised: torch.Tensor, x: torch.Tensor, sigma, sigma_data: float = SIGMA_DATA,
                       sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """f(x, sigma) = c_skip(sigma) x + c_out(sigma) D(x, sigma), from a denoiser's output D(x, sigma)."""
    s = _rows(sigma, x)
    c_skip, c_out = boundary_coefficients(s, sigma_data, sigma_min)
    return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * denoised


def karras_grid(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> torch.Tensor:
    """n + 1 noise levels sigma_min = s_0 < s_1 < ... < s_n = sigma_max, evenly spaced in sigma^(1/rho) (the
    discretisation consistency models train on; Song et al. 2023, sec. 3, with Karras et al.'s rho = 7)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def few_step_levels(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO):
    """n levels for n-step consistency sampling, then 0 (the end, as the samplers' levels end; no call is made there):
    the Karras grid of n intervals from the top, sigma_max first, without its bottom level sigma_min (where f is the
    identity: a call there would change nothing)."""
    return torch.cat([karras_grid(n, sigma_min, sigma_max, rho).flip(0)[:n], torch.zeros(1, dtype=torch.float64)])


def ode_step(denoiser, x: torch.Tensor, sigma, sigma_next, solver: str = "heun", **kwargs) -> torch.Tensor:
    """One step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma from sigma to sigma_next: Euler, or
    Heun's trapezoid (Karras et al. 2022, Algorithm 1). Both one number (the denoiser gets a float, as a course
    Denoiser takes it) or one per row (it gets a (B,) tensor)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    s, s_next = _rows(sigma, x), _rows(sigma_next, x)
    scalar = torch.as_tensor(sigma).ndim == 0 and torch.as_tensor(sigma_next).ndim == 0
    arg = (lambda v: float(v.flatten()[0])) if scalar else (lambda v: v.reshape(-1))  # a Denoiser takes one float
    d = (x - denoiser(x, arg(s), **kwargs)) / s
    x_next = x + (s_next - s) * d
    if solver == "euler":
        return x_next
    if not bool((s_next > 0).all()):
        raise ValueError("Heun's step needs sigma_next > 0 (it evaluates the denoiser there); use solver='euler'")
    d_next = (x_next - denoiser(x_next, arg(s_next), **kwargs)) / s_next
    return x + (s_next - s) * (d + d_next) / 2


def distance(a: torch.Tensor, b: torch.Tensor, kind: str = "l2", c: float | None = None) -> torch.Tensor:
    """Per-row distance: 'l2' the mean squared difference; 'pseudo_huber' sqrt(||a - b||^2 + c^2) - c (Song & Dhariwal
    2023, sec. 3.3; default c = 0.00054 sqrt(dimension))."""
    if kind not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {kind!r}")
    if kind == "l2":
        return ((a - b) ** 2).flatten(1).mean(1)
    return pseudo_huber(a, b, c if c is not None else 0.00054 * math.sqrt(a[0].numel()))


def consistency_distillation_loss(student, target, teacher, x0: torch.Tensor, noise: torch.Tensor, sigma, sigma_next,
                                  solver: str = "heun", kind: str = "l2", weight=None, **kwargs) -> torch.Tensor:
    """Song et al. 2023, Algorithm 2, one batch: x = x0 + sigma noise; the teacher's ODE step down to sigma_next
    gives x_next; the loss is d(student(x, sigma), target(x_next, sigma_next)) with the target (the EMA of the student)
    not differentiated; weighted per row by `weight` (default 1), averaged. student, target, teacher take (x, sigma
    per row) and return the consistency output (student, target) or the denoised estimate (teacher)."""
    s = _rows(sigma, x0)
    x = x0 + s * noise
    with torch.no_grad():
        x_next = ode_step(teacher, x, sigma, sigma_next, solver, **kwargs)
        aim = target(x_next, _rows(sigma_next, x0).reshape(-1), **kwargs)
    d = distance(student(x, s.reshape(-1), **kwargs), aim, kind)
    return (d if weight is None else d * torch.as_tensor(weight, dtype=d.dtype, device=d.device)).mean()


def consistency_training_loss(student, target, x0: torch.Tensor, noise: torch.Tensor, sigma, sigma_next,
                              kind: str = "pseudo_huber", **kwargs) -> torch.Tensor:
    """Song & Dhariwal 2023 (improved consistency training), one batch: no teacher; the two points share x0 and the
    noise, x = x0 + sigma n and x_next = x0 + sigma_next n, and the loss d(student(x), target(x_next)) is weighted by
    1 / (sigma - sigma_next) (sec. 3.5); the target is the student itself without its gradient (no EMA, sec. 3.2)."""
    s, s_next = _rows(sigma, x0), _rows(sigma_next, x0)
    with torch.no_grad():
        aim = target(x0 + s_next * noise, s_next.reshape(-1), **kwargs)
    d = distance(student(x0 + s * noise, s.reshape(-1), **kwargs), aim, kind)
    return (d / (s - s_next).reshape(-1)).mean()


def lognormal_grid_indices(n: int, grid: torch.Tensor, generator=None, p_mean: float = -1.1, p_std: float = 2.0):
    """n indices i into `grid` (i < len(grid) - 1: the pair (grid[i], grid[i + 1])), drawn with probability
    proportional to erf((ln s_{i+1} - p_mean) / (sqrt 2 p_std)) - erf((ln s_i - p_mean) / (sqrt 2 p_std)): the
    discretised log-normal of improved consistency training (Song & Dhariwal 2023, sec. 3.5)."""
    erf = torch.special.erf((grid.log() - p_mean) / (math.sqrt(2) * p_std))
    p = (erf[1:] - erf[:-1]).clamp_min(0)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=generator)


def improved_ct_steps(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """The number of grid intervals at training step k of `total`: s0 doubled every total / (log2(s1 / s0) + 1) steps,
    capped at s1 (Song & Dhariwal 2023, sec. 3.4, eq. 8)."""
    stage = total // (int(math.log2(s1 // s0)) + 1)
    return min(s0 * 2 ** (k // max(stage, 1)), s1)


def multistep_sample(f, noise: torch.Tensor, sigmas, generator=None, sigma_min: float = SIGMA_MIN, **kwargs):
    """Song et al. 2023, Algorithm 1: x = f(sigma_0 noise, sigma_0); then at each next level tau, noise the estimate
    back up, x_tau = x + sqrt(tau^2 - sigma_min^2) z, and map it again, x = f(x_tau, tau). len(sigmas) evaluations of
    f. `noise` is standard normal; sigmas decrease and stay above sigma_min."""
    sigmas = [float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).flatten()]
    if not sigmas or any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] <= sigma_min:
        raise ValueError(f"sigmas must decrease and stay above sigma_min = {sigma_min}, got {sigmas}")
    x = f(noise * sigmas[0], torch.full((noise.shape[0],), sigmas[0]), **kwargs)
    for tau in sigmas[1:]:
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = f(x + math.sqrt(tau * tau - sigma_min * sigma_min) * z, torch.full((x.shape[0],), tau), **kwargs)
    return x


def ode_flow_map(denoiser, x: torch.Tensor, sigma_from: float, sigma_to: float = SIGMA_MIN, steps: int = 100,
                 **kwargs) -> torch.Tensor:
    """Where the probability-flow ODE takes x from sigma_from to sigma_to: `steps` Heun steps on Karras levels (with an
    exact denoiser and enough steps, the exact consistency function f*(x, sigma_from))."""
    if not sigma_from > sigma_to > 0:
        raise ValueError(f"need sigma_from > sigma_to > 0, got {sigma_from} and {sigma_to}")
    levels = karras_grid(steps, sigma_to, sigma_from).flip(0).tolist()
    for s, s_next in zip(levels, levels[1:]):
        x = ode_step(denoiser, x, s, s_next, "heun", **kwargs)
    return x


def progressive_target(teacher, x: torch.Tensor, sigma, sigma_mid, sigma_next, **kwargs) -> torch.Tensor:
    """Salimans & Ho 2022, Algorithm 2, in the sigma view: two DDIM (Euler) steps of the teacher, sigma -> sigma_mid ->
    sigma_next, then the x0 estimate with which ONE DDIM step from x lands on the same point:
    x~0 = (x'' - (sigma_next / sigma) x) / (1 - sigma_next / sigma). The student regresses its D(x, sigma) on it."""
    s, s_mid, s_next = _rows(sigma, x), _rows(sigma_mid, x), _rows(sigma_next, x)
    if not (bool((s_mid < s).all()) and bool((s_next < s_mid).all()) and bool((s_next >= 0).all())):
        raise ValueError("progressive distillation steps down: need sigma > sigma_mid > sigma_next >= 0")
    with torch.no_grad():  # an Euler step to sigma_next = 0 is the denoiser's estimate itself
        x_mid = ode_step(teacher, x, sigma, sigma_mid, "euler", **kwargs)
        x_end = ode_step(teacher, x_mid, sigma_mid, sigma_next, "euler", **kwargs)
    ratio = s_next / s
    return (x_end - ratio * x) / (1 - ratio)
