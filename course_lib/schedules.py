"""Noise schedules: betas, alpha-bar, SNR, log-SNR and the variance-exploding sigma, with conversions.

Convention (the same as diffusers): a schedule has T steps indexed t = 0, ..., T-1, and
alpha_bar[t] = prod_{s<=t} (1 - beta[s]). Our t is the paper's t - 1 (Ho et al. 2020 count from 1).
Schedules are computed in float64 and returned as 1-D tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, int):
        raise TypeError(f"T (number of diffusion steps) must be an int, got {type(T).__name__}")
    if T < 1:
        raise ValueError(f"T (number of diffusion steps) must be >= 1, got {T}")
    return T


def _as_float64(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x.to(torch.float64)


def check_betas(betas: torch.Tensor) -> torch.Tensor:
    """Validate a beta schedule: a 1-D float tensor with every beta strictly inside (0, 1)."""
    b = _as_float64(betas, "betas")
    if b.ndim != 1 or b.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(b.shape)}")
    if torch.isnan(b).any():
        raise ValueError("betas contain NaN")
    if not ((b > 0) & (b < 1)).all():
        bad = b[(b <= 0) | (b >= 1)]
        raise ValueError(f"every beta must lie strictly inside (0, 1); found {bad[:3].tolist()}")
    return b


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear betas from beta_start to beta_end, scaled so any T matches T=1000 (Ho et al. 2020, sec. 4)."""
    T = _check_T(T)
    scale = 1000 / T
    return check_betas(torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64))


def cosine_alpha_bar_fn(u: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """The cosine alpha-bar curve f(u)/f(0), f(u) = cos^2((u+s)/(1+s) * pi/2) for u in [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


def betas_from_alpha_bar_fn(fn, T: int, max_beta: float = 0.999) -> torch.Tensor:
    """Discretise a continuous alpha-bar(u), u in [0,1], into T betas, clipped at max_beta (Nichol & Dhariwal 2021, eq. 17)."""
    T = _check_T(T)
    u = torch.arange(T + 1, dtype=torch.float64) / T
    ab = fn(u)
    betas = 1 - ab[1:] / ab[:-1]
    return check_betas(betas.clamp(min=1e-12, max=max_beta))


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas clipped at 0.999 as in the paper."""
    return betas_from_alpha_bar_fn(lambda u: cosine_alpha_bar_fn(u, s), T, max_beta)


def sigmoid_betas(T: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = 0.999) -> torch.Tensor:
    """Sigmoid schedule: alpha-bar follows a shifted sigmoid in u (Jabri et al. 2022, 'Scalable adaptive computation', Alg. 1)."""
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))

    def fn(u):
        return (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)

    return betas_from_alpha_bar_fn(fn, T, max_beta)


def scaled_linear_betas(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Linear in sqrt(beta), Stable Diffusion's schedule (Rombach et al. 2022; diffusers' 'scaled_linear')."""
    T = _check_T(T)
    return check_betas(torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2)


def rescale_zero_terminal_snr(betas: torch.Tensor, floor: float = 2.0 ** -24) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so that it keeps its first value and reaches 0 at
    the last step (zero terminal SNR: the last step is pure noise). alpha_bar can only be > 0 here (sigma finite), so
    the last one is set to `floor` (2^-24, as diffusers does: sigma 4,096, SNR 6e-8), or to half the one before it if
    that is smaller (alpha_bar must keep falling)."""
    if not 0 < floor < 1e-3:
        raise ValueError(f"floor must be in (0, 1e-3), got {floor!r}")
    root = alpha_bar_from_betas(betas).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    ab = root ** 2
    ab[-1] = min(floor, float(ab[-2]) / 2)
    return betas_from_alpha_bar(ab)


SCHEDULES = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
    "scaled_linear": scaled_linear_betas,
}
# lesson 11: two of them rescaled to zero terminal SNR (Lin et al. 2024); ALL_SCHEDULES is what a config may name
ZERO_SNR_SCHEDULES = {
    "linear_zero_snr": lambda T=1000, **kw: rescale_zero_terminal_snr(linear_betas(T, **kw)),
    "scaled_linear_zero_snr": lambda T=1000, **kw: rescale_zero_terminal_snr(scaled_linear_betas(T, **kw)),
}
ALL_SCHEDULES = {**SCHEDULES, **ZERO_SNR_SCHEDULES}


def make_betas(name: str, T: int = 1000, **kwargs) -> torch.Tensor:
    """Betas of the schedule called `name` (one of ALL_SCHEDULES)."""
    if not isinstance(name, str):
        raise TypeError(f"schedule name must be a str, got {type(name).__name__}")
    if name not in ALL_SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(ALL_SCHEDULES)}")
    return ALL_SCHEDULES[name](T, **kwargs)


# ---- conversions between the views of one schedule -------------------------------------------

def alpha_bar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar[t] = prod_{s<=t} (1 - beta[s]) (Ho et al. 2020, eq. 4)."""
    return torch.cumprod(1 - check_betas(betas), dim=0)


def _check_alpha_bar(alpha_bar) -> torch.Tensor:
    ab = _as_float64(alpha_bar, "alpha_bar")
    if torch.isnan(ab).any() or not ((ab > 0) & (ab <= 1)).all():
        raise ValueError("alpha_bar values must lie in (0, 1]")
    return ab


def betas_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Invert alpha_bar_from_betas: beta[t] = 1 - alpha_bar[t] / alpha_bar[t-1]."""
    ab = _check_alpha_bar(alpha_bar)
    if ab.ndim != 1:
        raise ValueError(f"alpha_bar must be 1-D, got shape {tuple(ab.shape)}")
    prev = torch.cat([ab.new_ones(1), ab[:-1]])
    return check_betas(1 - ab / prev)


def snr_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR = alpha_bar / (1 - alpha_bar) (Kingma et al. 2021, eq. 2)."""
    ab = _check_alpha_bar(alpha_bar)
    return ab / (1 - ab)


def log_snr_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """log SNR = log(alpha_bar) - log(1 - alpha_bar), computed stably (Kingma et al. 2021, lambda_t)."""
    ab = _check_alpha_bar(alpha_bar)
    return torch.log(ab) - torch.log1p(-ab)


def alpha_bar_from_log_snr(log_snr: torch.Tensor) -> torch.Tensor:
    """alpha_bar = sigmoid(log SNR), the inverse of log_snr_from_alpha_bar."""
    return torch.sigmoid(_as_float64(log_snr, "log_snr"))


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Variance-exploding sigma = sqrt((1 - alpha_bar) / alpha_bar): x_t / sqrt(alpha_bar) = x_0 + sigma * eps (Karras et al. 2022, sec. 2)."""
    ab = _check_alpha_bar(alpha_bar)
    return torch.sqrt((1 - ab) / ab)


def alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """alpha_bar = 1 / (1 + sigma^2), the inverse of sigma_from_alpha_bar."""
    s = _as_float64(sigma, "sigma")
    if torch.isnan(s).any() or (s < 0).any():
        raise ValueError("sigma must be >= 0")
    return 1 / (1 + s**2)


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete schedule of T steps and every view of it (betas, alpha_bar, SNR, sigma), as float64 tensors."""

    betas: torch.Tensor
    name: str = "custom"

    def __post_init__(self):
        object.__setattr__(self, "betas", check_betas(self.betas))

    @classmethod
    def named(cls, name: str, T: int = 1000, **kwargs) -> NoiseSchedule:
        """The schedule called `name` (linear, cosine, sigmoid, scaled_linear) with T steps."""
        return cls(make_betas(name, T, **kwargs), name=name)

    @property
    def T(self) -> int:
        return self.betas.numel()

    @property
    def alphas(self) -> torch.Tensor:
        return 1 - self.betas

    @property
    def alpha_bar(self) -> torch.Tensor:
        return alpha_bar_from_betas(self.betas)

    @property
    def snr(self) -> torch.Tensor:
        return snr_from_alpha_bar(self.alpha_bar)

    @property
    def log_snr(self) -> torch.Tensor:
        return log_snr_from_alpha_bar(self.alpha_bar)

    @property
    def sigmas(self) -> torch.Tensor:
        return sigma_from_alpha_bar(self.alpha_bar)

    def check_timesteps(self, t) -> torch.Tensor:
        """Validate t (an int or an integer tensor) against 0 <= t < T and return it as a long tensor."""
        if isinstance(t, bool):
            raise TypeError("timesteps must be ints, got a bool")
        if isinstance(t, int):
            t = torch.tensor(t)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"timesteps must be an int or an integer tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"timesteps must be integers (torch.long), got dtype {t.dtype}")
        t = t.long()
        if t.numel() and (t.min() < 0 or t.max() >= self.T):
            raise ValueError(f"timesteps must lie in [0, {self.T - 1}] for this {self.T}-step schedule; "
                             f"got values in [{int(t.min())}, {int(t.max())}]")
        return t

    def at(self, values: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
        """Gather values[t] and reshape to broadcast against `like` (batch first), in like's dtype and device."""
        t = self.check_timesteps(t)
        out = values.to(like.device)[t.to(like.device)].to(like.dtype)
        if t.ndim == 0:
            return out
        if t.ndim != 1 or t.shape[0] != like.shape[0]:
            raise ValueError(f"timesteps must be a scalar or have shape (batch,) = ({like.shape[0]},), "
                             f"got shape {tuple(t.shape)}")
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def __repr__(self) -> str:
        ab = self.alpha_bar
        return (f"NoiseSchedule({self.name!r}, T={self.T}, alpha_bar from {ab[0]:.5f} to {ab[-1]:.3g}, "
                f"log-SNR from {self.log_snr[0]:.2f} to {self.log_snr[-1]:.2f})")
