"""The forward (noising) process: one Markov step q(x_t | x_{t-1}) and the closed form q(x_t | x_0)."""
from __future__ import annotations

import torch

from .schedules import NoiseSchedule


def _check_data(x, name: str = "x0") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype} (try {name}.float())")
    if x.ndim < 1:
        raise ValueError(f"{name} must have a batch dimension, got a scalar")
    return x


def _noise_like(x: torch.Tensor, noise, generator) -> torch.Tensor:
    if noise is None:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor or None, got {type(noise).__name__}")
    if noise.shape != x.shape:
        raise ValueError(f"noise must have the data's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    return noise.to(x.dtype)


def q_mean_std(x0: torch.Tensor, t, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sqrt(alpha_bar_t) x0 and std sqrt(1 - alpha_bar_t) of q(x_t | x_0) (Ho et al. 2020, eq. 4)."""
    x0 = _check_data(x0)
    ab = schedule.at(schedule.alpha_bar, t, x0)
    return ab.sqrt() * x0, (1 - ab).sqrt()


def q_sample(x0: torch.Tensor, t, schedule: NoiseSchedule, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps in one shot (Ho et al. 2020, eq. 4)."""
    mean, std = q_mean_std(x0, t, schedule)
    return mean + std * _noise_like(x0, noise, generator)


def q_step(x_prev: torch.Tensor, t, schedule: NoiseSchedule, noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One Markov step x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps (Ho et al. 2020, eq. 2)."""
    x_prev = _check_data(x_prev, "x_prev")
    beta = schedule.at(schedule.betas, t, x_prev)
    return (1 - beta).sqrt() * x_prev + beta.sqrt() * _noise_like(x_prev, noise, generator)


def q_chain(x0: torch.Tensor, schedule: NoiseSchedule, t_end: int | None = None,
            generator: torch.Generator | None = None, keep: list[int] | None = None):
    """Run q_step for t = 0..t_end (default T-1) from clean data; return x_{t_end}, and the states at `keep` if given."""
    x = _check_data(x0)
    t_end = schedule.T - 1 if t_end is None else int(schedule.check_timesteps(t_end))
    keep_set = set() if keep is None else {int(k) for k in schedule.check_timesteps(torch.as_tensor(keep)).tolist()}
    if any(k > t_end for k in keep_set):
        raise ValueError(f"keep asks for steps after t_end={t_end}: {sorted(k for k in keep_set if k > t_end)}")
    kept = {}
    for t in range(t_end + 1):
        x = q_step(x, t, schedule, generator=generator)
        if t in keep_set:
            kept[t] = x.clone()
    return (x, kept) if keep is not None else x
