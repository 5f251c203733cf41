"""Samplers: turn noise into data with a trained model. Each is one function of (model, x, schedule, timesteps, ...).

A model is any callable `model(x, t, **kwargs)` whose output type (eps, x0 or v) is given by `prediction`.
"""
from __future__ import annotations

import torch

from .losses import convert, posterior_coefficients
from .schedules import NoiseSchedule


def check_timesteps(timesteps, schedule: NoiseSchedule) -> list[int]:
    """A strictly decreasing list of integer timesteps in [0, T-1], or a clear error."""
    if timesteps is None:
        return list(range(schedule.T - 1, -1, -1))
    ts = [int(t) for t in torch.as_tensor(timesteps).flatten().tolist()]
    if not ts:
        raise ValueError("timesteps must not be empty")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing (noisiest first), got {ts[:8]}...")
    if ts[0] >= schedule.T or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {schedule.T - 1}], got {ts[0]} ... {ts[-1]}")
    return ts


def uniform_timesteps(schedule: NoiseSchedule, n: int) -> list[int]:
    """n timesteps evenly spaced from T-1 down to 0 (respacing as in Nichol & Dhariwal 2021, sec. 4)."""
    if not isinstance(n, int) or not 1 <= n <= schedule.T:
        raise ValueError(f"n must be an int in [1, {schedule.T}], got {n!r}")
    return sorted({round(i * (schedule.T - 1) / max(n - 1, 1)) for i in range(n)}, reverse=True)


@torch.no_grad()
def sample_ddpm(model, x: torch.Tensor, schedule: NoiseSchedule, timesteps=None, prediction: str | None = None,
                variance: str = "beta", clip: float | None = None, generator: torch.Generator | None = None,
                progress: bool = False, return_trajectory: bool = False, **model_kwargs):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over any decreasing subsequence of timesteps.

    Between consecutive timesteps t > s it draws x_s ~ q(x_s | x_t, x0_hat) with x0_hat the model's estimate;
    `variance` 'beta' uses beta_{t|s} = 1 - ab_t / ab_s, 'posterior' the posterior's beta-tilde (eq. 7).
    The last step returns the model's x0 estimate. `clip` clamps x0_hat to [-clip, clip] (images in [-1, 1]).
    """
    prediction = prediction or getattr(model, "prediction", None)
    if prediction not in ("eps", "x0", "v"):
        raise ValueError(f"pass prediction='eps', 'x0' or 'v' (the model does not declare one), got {prediction!r}")
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
    ts = check_timesteps(timesteps, schedule)
    ab = schedule.alpha_bar
    traj = [x.cpu()] if return_trajectory else None
    steps = ts
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(ts, desc="DDPM", leave=False)
    for i, t in enumerate(steps):
        ab_t = ab[t].to(x.dtype)
        out = model(x, torch.full((x.shape[0],), t, device=x.device), **model_kwargs)
        x0 = convert(out, prediction, "x0", x, ab_t)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if i == len(ts) - 1:
            x = x0
        else:
            ab_s = ab[ts[i + 1]]
            coef_x0, coef_xt, var = posterior_coefficients(ab[t], ab_s)
            if variance == "beta":
                var = 1 - ab[t] / ab_s
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = coef_x0.to(x.dtype) * x0 + coef_xt.to(x.dtype) * x + var.sqrt().to(x.dtype) * noise
        if traj is not None:
            traj.append(x.cpu())
    return (x, torch.stack(traj)) if return_trajectory else x
