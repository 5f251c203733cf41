"""The denoising objective: eps / x0 / v / score parametrizations, the true posterior, SNR weighting, the simple loss.

All functions take alpha_bar_t already gathered and broadcastable against x_t (see NoiseSchedule.at).
"""
from __future__ import annotations

import torch

from .forward import q_sample
from .schedules import NoiseSchedule

PREDICTIONS = ("eps", "x0", "v", "score")


def _check_prediction(kind: str) -> str:
    if kind not in PREDICTIONS:
        raise ValueError(f"prediction type must be one of {PREDICTIONS}, got {kind!r}")
    return kind


def v_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, sec. 4)."""
    return alpha_bar_t.sqrt() * eps - (1 - alpha_bar_t).sqrt() * x0


def to_eps(pred: torch.Tensor, kind: str, x_t: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Convert a model output of type `kind` into the noise eps it implies, given x_t = sqrt(ab) x0 + sqrt(1-ab) eps."""
    a, s = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
    if _check_prediction(kind) == "eps":
        return pred
    if kind == "x0":
        return (x_t - a * pred) / s
    if kind == "v":
        return s * x_t + a * pred
    return -s * pred  # score = grad log q(x_t) = -eps / sqrt(1 - ab) (Song et al. 2021, eq. 4 and sec. 3.3)


def from_eps(eps: torch.Tensor, kind: str, x_t: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Convert a noise eps into the quantity of type `kind` (eps, x0, v or score) it implies at x_t."""
    a, s = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
    if _check_prediction(kind) == "eps":
        return eps
    x0 = (x_t - s * eps) / a
    if kind == "x0":
        return x0
    if kind == "v":
        return v_target(x0, eps, alpha_bar_t)
    return -eps / s


def convert(pred: torch.Tensor, src: str, dst: str, x_t: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Convert a prediction between eps, x0, v and score parametrizations at the same x_t."""
    return from_eps(to_eps(pred, src, x_t, alpha_bar_t), dst, x_t, alpha_bar_t)


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, t, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7); at t = 0 the variance is 0."""
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 and x_t must have the same shape, got {tuple(x0.shape)} and {tuple(x_t.shape)}")
    ab, beta = schedule.alpha_bar, schedule.betas  # coefficients in float64, then gathered: 1 - ab is tiny at t = 0
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    coef_x0 = ab_prev.sqrt() * beta / (1 - ab)
    coef_xt = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
    mean = schedule.at(coef_x0, t, x_t) * x0 + schedule.at(coef_xt, t, x_t) * x_t
    var = schedule.at(beta * (1 - ab_prev) / (1 - ab), t, x_t)
    return mean, var


def snr_weight(snr: torch.Tensor, prediction: str = "eps", kind: str = "uniform", gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weight: 'uniform' (1) or 'min_snr' (min(SNR, gamma) expressed for the prediction type; Hang et al. 2023, eq. 7)."""
    _check_prediction(prediction)
    if kind == "uniform":
        return torch.ones_like(snr)
    if kind != "min_snr":
        raise ValueError(f"weighting must be 'uniform' or 'min_snr', got {kind!r}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    clipped = snr.clamp(max=gamma)
    # the x0-space weight min(SNR, gamma) rewritten for each target's scale
    return {"x0": clipped, "eps": clipped / snr, "v": clipped / (snr + 1), "score": clipped / snr}[prediction]


def training_target(kind: str, x0: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor,
                    alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """What a model of prediction type `kind` is trained to output for (x0, eps)."""
    if kind == "x0":
        return x0  # exact, rather than recovered from x_t with rounding error
    return from_eps(eps, kind, x_t, alpha_bar_t)


def diffusion_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, prediction: str = "eps",
                   weighting: str = "uniform", gamma: float = 5.0, generator: torch.Generator | None = None,
                   **model_kwargs) -> torch.Tensor:
    """The simple loss E_{t, eps} w(t) ||target - model(x_t, t)||^2 with t uniform (Ho et al. 2020, eq. 14)."""
    _check_prediction(prediction)
    b = x0.shape[0]
    t = torch.randint(schedule.T, (b,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(x0, t, schedule, noise=eps)
    ab_t = schedule.at(schedule.alpha_bar, t, x0)
    target = training_target(prediction, x0, eps, x_t, ab_t)
    out = model(x_t, t, **model_kwargs)
    if out.shape != target.shape:
        raise ValueError(f"model output shape {tuple(out.shape)} differs from the data's {tuple(target.shape)}")
    per_sample = ((out - target) ** 2).flatten(1).mean(1)
    w = snr_weight((ab_t / (1 - ab_t)).flatten(), prediction, weighting, gamma)
    return (w * per_sample).mean()
