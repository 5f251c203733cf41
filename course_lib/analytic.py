"""Exact models for data whose distribution is known: they plug into samplers and bounds like a trained network."""
from __future__ import annotations

import torch

from .schedules import NoiseSchedule


def gaussian_eps_model(schedule: NoiseSchedule, std: float):
    """The exact eps-predictor for data ~ N(0, std^2 I): E[eps | x_t] = sqrt(1-ab) x_t / (ab std^2 + 1 - ab)."""
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std!r}")

    def model(x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0]) if torch.as_tensor(t).ndim == 0 else t
        ab = schedule.at(schedule.alpha_bar, t, x).to(x.dtype)
        return (1 - ab).sqrt() * x / (ab * std**2 + 1 - ab)

    model.prediction = "eps"
    return model
