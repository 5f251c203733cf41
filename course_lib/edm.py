"""EDM's training recipe (Karras et al. 2022, "Elucidating the Design Space", Table 1 and sec. 5; EDM2, Karras et al.
2024, sec. 2): the preconditioning of the denoiser, the training noise distribution, the loss weighting, the loss.

Everything is in the sigma view x = x0 + sigma n. A network F is made a denoiser by
D(x, sigma) = c_skip x + c_out F(c_in x, c_noise); the loss is E_sigma,n lambda(sigma) ||D(x0 + sigma n) - x0||^2.
Two preconditionings: 'edm' (Table 1's, from 'unit variance in, unit variance out') and 'vp' (an eps network on a
discrete schedule written in the same form: c_skip 1, c_out -sigma, c_in 1 / sqrt(1 + sigma^2)).
"""
from __future__ import annotations

import math

import torch

SIGMA_DATA = 0.5                 # the data's std EDM assumes for images in [-1, 1]
P_MEAN, P_STD = -1.2, 1.2         # EDM's log-normal training noise: ln sigma ~ N(P_mean, P_std^2) (sec. 5)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # the range EDM samples over
# The networks' time embeddings were built for timesteps 0 .. 999; an EDM network sees c_noise = ln(sigma) / 4 there as
# TIME_SHIFT + TIME_SCALE * c_noise: sigma 0.002 .. 80 lands on about -120 .. 940, the span a discrete network knows.
TIME_SCALE, TIME_SHIFT = 400.0, 500.0
PRECONDITIONINGS = ("edm", "vp")
NOISE_DISTRIBUTIONS = ("lognormal", "uniform_t")
LOSS_WEIGHTINGS = ("edm", "eps", "min_snr", "uniform")


def _sigma(sigma) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.get_default_dtype()) if not isinstance(sigma, torch.Tensor) else sigma
    if not s.is_floating_point():
        s = s.to(torch.get_default_dtype())
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError("sigma must be finite and > 0")
    return s


def _check_sigma_data(sigma_data) -> float:
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not 0 < sigma_data < math.inf:
        raise ValueError(f"sigma_data must be a number > 0 (the data's standard deviation), got {sigma_data!r}")
    return float(sigma_data)


def preconditioning(sigma, sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) of EDM (Karras et al. 2022, Table 1 and app. B.6): the input c_in x and the
    network's target (x0 - c_skip x) / c_out have unit variance at every sigma, and c_out is as small as that allows."""
    s, sd = _sigma(sigma), _check_sigma_data(sigma_data)
    total = s * s + sd * sd
    return sd * sd / total, s * sd / total.sqrt(), 1 / total.sqrt(), s.log() / 4


def vp_preconditioning(sigma, schedule) -> tuple[torch.Tensor, ...]:
    """An eps-predicting network on a discrete schedule, in the same form (Karras et al. 2022, Table 1, 'VP'):
    c_skip 1, c_out -sigma, c_in 1 / sqrt(1 + sigma^2), c_noise the (fractional) timestep whose sigma this is."""
    from .samplers import sigma_to_t

    s = _sigma(sigma)
    t = torch.tensor([sigma_to_t(schedule, float(v)) for v in s.flatten()], dtype=s.dtype).reshape(s.shape)
    return torch.ones_like(s), -s, 1 / (1 + s * s).sqrt(), t


def network_time(c_noise: torch.Tensor) -> torch.Tensor:
    """Where EDM's c_noise enters a network built for timesteps 0 .. 999 (TIME_SHIFT + TIME_SCALE * c_noise)."""
    return TIME_SHIFT + TIME_SCALE * c_noise


def training_target(x0: torch.Tensor, noise: torch.Tensor, sigma, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """What F is regressed on under EDM's preconditioning: (x0 - c_skip (x0 + sigma n)) / c_out (eq. 8)."""
    c_skip, c_out, _, _ = preconditioning(sigma, sigma_data)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    c_skip, c_out, s = (v.reshape(shape).to(x0.dtype) for v in (c_skip, c_out, _sigma(sigma)))
    return (x0 - c_skip * (x0 + s * noise)) / c_out


def draw_sigmas(n: int, kind: str = "lognormal", generator: torch.Generator | None = None, p_mean: float = P_MEAN,
                p_std: float = P_STD, schedule=None) -> torch.Tensor:
    """Training noise levels: 'lognormal' (ln sigma ~ N(p_mean, p_std^2), EDM sec. 5) or 'uniform_t' (a timestep of
    `schedule` drawn uniformly, the sigma it implies: lesson 2's way)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if kind == "lognormal":
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std!r}")
        return (p_mean + p_std * torch.randn(n, generator=generator)).exp()
    if kind == "uniform_t":
        if schedule is None:
            raise ValueError("noise='uniform_t' draws timesteps of a schedule: pass schedule=")
        t = torch.randint(schedule.T, (n,), generator=generator)
        return schedule.sigmas[t].to(torch.get_default_dtype())
    raise ValueError(f"noise must be one of {NOISE_DISTRIBUTIONS}, got {kind!r}")


def loss_weight(sigma, kind: str = "edm", sigma_data: float = SIGMA_DATA, gamma: float = 5.0) -> torch.Tensor:
    """lambda(sigma) on the denoiser's squared error ||D - x0||^2, with SNR = 1 / sigma^2:
    'edm' 1 / c_out^2 = SNR + 1 / sigma_data^2 (EDM eq. 8); 'eps' SNR (lesson 2's eps loss, ||eps_hat - n||^2 =
    ||D - x0||^2 / sigma^2); 'min_snr' min(SNR, gamma) (Hang et al. 2023); 'uniform' 1 (an x0 loss)."""
    s = _sigma(sigma)
    snr = 1 / (s * s)
    if kind == "edm":
        return snr + 1 / _check_sigma_data(sigma_data) ** 2
    if kind == "eps":
        return snr
    if kind == "min_snr":
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        return snr.clamp(max=gamma)
    if kind == "uniform":
        return torch.ones_like(s)
    raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {kind!r}")


def edm_loss(net, x0: torch.Tensor, sigma: torch.Tensor, weighting: str = "edm", noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, gamma: float = 5.0, learned: bool = False,
             **model_kwargs) -> torch.Tensor:
    """E lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2 over the batch (EDM eq. 2 and 8), per element.

    `net(x, sigma)` is a denoiser (nets.EDMPrecond). learned=True: EDM2's uncertainty weighting (Karras et al. 2024,
    eq. 21): lambda / exp(u(sigma)) * error + u(sigma), u the network's learned log-variance."""
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor, got {type(x0).__name__}")
    sigma = _sigma(sigma).to(x0.device, x0.dtype)
    if sigma.shape != (x0.shape[0],):
        raise ValueError(f"need one sigma per row: shape ({x0.shape[0]},), got {tuple(sigma.shape)}")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x = x0 + sigma.reshape((-1,) + (1,) * (x0.ndim - 1)) * noise
    sigma_data = getattr(net, "sigma_data", SIGMA_DATA)
    w = loss_weight(sigma, weighting, sigma_data, gamma)
    if learned:
        out, logvar = net(x, sigma, return_logvar=True, **model_kwargs)
    else:
        out, logvar = net(x, sigma, **model_kwargs), None
    if out.shape != x0.shape:
        raise ValueError(f"the denoiser returned shape {tuple(out.shape)} for data of shape {tuple(x0.shape)}")
    per_row = ((out - x0) ** 2).flatten(1).mean(1) * w
    if logvar is not None:
        per_row = per_row / logvar.exp() + logvar
    return per_row.mean()


def loss_by_sigma(denoiser, x0: torch.Tensor, sigmas, weighting: str | None = None, sigma_data: float = SIGMA_DATA,
                  seed: int = 0, **model_kwargs) -> torch.Tensor:
    """The denoiser's mean squared error ||D(x0 + sigma n, sigma) - x0||^2 per element at each of `sigmas` (times
    lambda(sigma) when `weighting` is given): where a model's error, and a loss's attention, sit."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for s in _sigma(sigmas).flatten().tolist():
            noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            err = float(((denoiser(x0 + s * noise, s, **model_kwargs) - x0) ** 2).mean())
            out.append(err * (float(loss_weight(s, weighting, sigma_data)) if weighting else 1.0))
    return torch.tensor(out, dtype=torch.float64)
