"""Flow matching and rectified flow (Lipman et al. 2023, eq. 20-23; Liu et al. 2023, eq. 1): straight conditional paths
x_t = (1 - t) x0 + t noise, a network regressed on their velocity noise - x0, and that network as a denoiser for every
sampler in course_lib.samplers.

Conventions: t = 0 is the data and t = 1 the noise, as in diffusion (and Stable Diffusion 3). The network sees
t * TIME_SCALE, the range of the diffusion networks' timesteps, so the same networks serve both. In the samplers'
sigma view (x = x0 + sigma eps) the point x_t is x_t / (1 - t) with sigma = t / (1 - t): the same Gaussian paths as
diffusion, another time axis and another loss weighting.
"""
from __future__ import annotations

import torch

from .samplers import FLOW_T_RANGE, FLOW_TIME_SCALE, velocity_denoiser  # noqa: F401  (the samplers' adapter)
from .step_schedules import time_sigmas  # noqa: F401  (uniform in t)

TIME_SCALE = FLOW_TIME_SCALE
T_MIN, T_MAX = FLOW_T_RANGE
PREDICTION = "flow"                          # a network's .prediction when it predicts the velocity noise - x0
TIMES = ("uniform", "logit_normal", "one")   # how training draws t (logit-normal: Esser et al. 2024, eq. 19)


def _t_like(t, x: torch.Tensor) -> torch.Tensor:
    """t as a tensor broadcastable against x: a scalar, or one value per row (B,)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """The conditional path x_t = (1 - t) x0 + t noise (Liu et al. 2023, eq. 1; Lipman et al. 2023 with sigma_min = 0)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    t = _t_like(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / dt along the conditional path: noise - x0, the same at every t (Lipman et al. 2023, eq. 23)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    return noise - x0


def sample_times(n: int, kind: str = "uniform", generator: torch.Generator | None = None) -> torch.Tensor:
    """n training times in [0, 1]: uniform; logit-normal (sigmoid of a standard normal, SD3's default); or all 1
    ('one': the one-step distillation of a reflowed model, Liu et al. 2023, sec. 2.3)."""
    if kind not in TIMES:
        raise ValueError(f"time sampling must be one of {TIMES}, got {kind!r}")
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    return torch.ones(n)


LOSSES = ("mse", "pseudo_huber")  # how far the prediction is from the target (pseudo-Huber: Lee et al. 2024, sec. 4.2)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||pred - target||^2 + c^2) - c per sample (Song & Dhariwal 2023, sec. 3.3): quadratic within c of the
    target, linear beyond, so that a few large errors (reflow's pairs where the coupling jumps between modes) do not
    outweigh the many small ones. Shape (B,)."""
    if c <= 0:
        raise ValueError(f"the pseudo-Huber constant c must be > 0, got {c}")
    d2 = ((pred - target) ** 2).flatten(1).sum(1)
    return torch.sqrt(d2 + c * c) - c


def flow_matching_loss(model, x0: torch.Tensor, noise: torch.Tensor | None = None, t: torch.Tensor | None = None,
                       times: str = "uniform", generator: torch.Generator | None = None, loss: str = "mse",
                       huber_c: float = 0.01, **model_kwargs) -> torch.Tensor:
    """The conditional flow-matching loss E || model(x_t, t) - (noise - x0) ||^2 (Lipman et al. 2023, eq. 23), the
    mean over every element; with loss="pseudo_huber", the mean over samples of pseudo_huber(..., huber_c) instead
    (what Lee et al. 2024 train reflow with). noise (default: fresh standard normal) is the partner of x0: independent
    for flow matching, the teacher's own noise for reflow."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    if t is None:
        t = sample_times(x0.shape[0], times, generator)
    t = torch.as_tensor(t, dtype=x0.dtype).to(x0.device)
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    pred = model(interpolate(x0, noise, t), t * TIME_SCALE, **model_kwargs)
    if loss == "pseudo_huber":
        return pseudo_huber(pred, velocity_target(x0, noise), huber_c).mean()
    return ((pred - velocity_target(x0, noise)) ** 2).mean()


# ---- the same paths in the samplers' sigma view ---------------------------------------------------------------

def sigma_of_t(t):
    """sigma = t / (1 - t): x_t / (1 - t) = x0 + sigma noise."""
    return t / (1 - t)


def t_of_sigma(sigma):
    """t = sigma / (1 + sigma), the inverse of sigma_of_t."""
    return sigma / (1 + sigma)


def denoiser_velocity(denoiser):
    """The other direction: any D(x, sigma) as the velocity field of the linear path, v(x_t, t) = (x_t - D) / t with
    D taken at sigma = t / (1 - t) and x = x_t / (1 - t). A diffusion model and a flow model become one kind of object,
    and their straightness, likelihood and trajectories are measured on one time axis."""
    def v(x_t: torch.Tensor, t: float, **kwargs) -> torch.Tensor:
        t = float(t)
        if not 0 < t < 1:
            raise ValueError(f"t must be in (0, 1), got {t}")
        x0 = denoiser(x_t / (1 - t), sigma_of_t(t), **kwargs)
        return (x_t - x0) / t

    return v


@torch.no_grad()
def straightness(velocity, noise: torch.Tensor, steps: int = 100, t_max: float = T_MAX, **model_kwargs) -> dict:
    """How far the ODE path from `noise` (t = t_max) to data (t = 0) is from a straight line (Liu et al. 2023, eq. 6):
    S = integral over t of E || (x_1 - x_0) - v(x_t, t) ||^2, by Euler with `steps` uniform steps; 0 only for straight
    paths. Also returned relative to E || x_1 - x_0 ||^2, so that data sets of different scale compare, and the path
    itself (steps + 1, B, ...) for plotting."""
    ts = torch.linspace(t_max, 0, steps + 1, dtype=torch.float64).tolist()
    x, vs, path = noise.clone(), [], [noise.clone()]
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t, **model_kwargs)
        vs.append(v)
        x = x + (t_next - t) * v
        path.append(x)
    chord = (noise - x) / t_max  # the straight line's constant velocity
    dev = torch.stack([((chord - v) ** 2).flatten(1).sum(1) for v in vs])  # (steps, B)
    s = float(dev.mean() * t_max)
    return {"straightness": s, "relative": s / float((chord ** 2).flatten(1).sum(1).mean() * t_max), "x0": x,
            "path": torch.stack(path)}


def reflow_pairs(denoiser, noise: torch.Tensor, sampler: str = "heun", nfe: int = 99, **model_kwargs) -> torch.Tensor:
    """The coupling rectified flow trains on (Liu et al. 2023, Algorithm 1, 'reflow'): each noise with the sample the
    model's ODE takes it to, solved accurately (Heun, 50 steps by default). Returns the samples; pair row i with noise i."""
    from .samplers import sample, steps_for_nfe

    steps = steps_for_nfe(sampler, nfe)
    sigmas = time_sigmas(steps) if getattr(denoiser, "path", "vp") == "linear" else None
    kw = {"sigmas": sigmas} if sigmas is not None else {"steps": steps, "spacing": "karras"}
    return sample(denoiser, noise, sampler=sampler, model_kwargs=model_kwargs, **kw).x


def transport_cost(noise: torch.Tensor, x0: torch.Tensor) -> float:
    """E || noise - x0 ||^2 of a coupling: reflow never raises it for a convex cost (Liu et al. 2023, Theorem 3.5)."""
    return float(((noise - x0) ** 2).flatten(1).sum(1).mean())
