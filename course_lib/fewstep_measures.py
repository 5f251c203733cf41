"""Lesson 12's measurements of why few steps are hard and what a consistency function is: a teacher's accurate ODE
trajectories, how far its denoiser's estimate travels along them, the endpoint error of 1-16 Euler steps (Karras et
al. 2022's ODE, Algorithm 1), and how far a trained student's answer lies from the path's end at every level."""
from __future__ import annotations

import torch

from .consistency import SIGMA_MAX, SIGMA_MIN, karras_grid, ode_step


def _rows(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)


@torch.no_grad()
def accurate_trajectory(denoiser, noise: torch.Tensor, steps: int = 128, sigma_max: float = SIGMA_MAX,
                        sigma_min: float = SIGMA_MIN) -> dict:
    """The probability-flow ODE from sigma_max * noise, `steps` Heun steps on Karras levels down to sigma_min, then the
    denoiser's last estimate: {'sigmas' (ascending order reversed: from sigma_max), 'x' the states, 'estimates'
    D(x, sigma) at each level, 'end' the sample}. `denoiser(x, sigma)` takes one sigma per row."""
    levels = karras_grid(steps, sigma_min, sigma_max).flip(0).tolist()
    x = noise * sigma_max
    states, estimates = [], []
    for s, s_next in zip(levels, levels[1:] + [None]):
        states.append(x)
        estimates.append(denoiser(x, _rows(x, s)))
        if s_next is not None:
            x = ode_step(denoiser, x, _rows(x, s), _rows(x, s_next), "heun")
    return {"sigmas": levels, "x": states, "estimates": estimates, "end": estimates[-1]}


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference per pixel."""
    return float(((a - b) ** 2).mean().sqrt())


def estimate_travel(trajectory: dict) -> list[float]:
    """At each level of an accurate trajectory, the RMS distance of the denoiser's estimate D(x, sigma) from where the
    trajectory ends: zero everywhere would make one step exact (a straight path); large values far from the end are
    what a few-step sampler has to cover in one jump."""
    return [rms(e, trajectory["end"]) for e in trajectory["estimates"]]


@torch.no_grad()
def euler_errors(denoiser, noise: torch.Tensor, end: torch.Tensor, budgets=(1, 2, 4, 8, 16),
                 sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN) -> dict:
    """{k: RMS distance of k Euler steps (Karras levels from sigma_max, the last step landing on D) from the accurate
    endpoint of the same noise}."""
    from .step_schedules import karras_sigmas

    out = {}
    for k in budgets:
        levels = karras_sigmas(k, sigma_min, sigma_max).tolist()
        x = noise * sigma_max
        for s, s_next in zip(levels, levels[1:]):
            d = denoiser(x, _rows(x, s))
            x = d if s_next == 0 else x + (s_next - s) * (x - d) / s
        out[k] = rms(x, end)
    return out


@torch.no_grad()
def distance_to_end(model, trajectory: dict, every: int | None = None) -> list[tuple[float, float]]:
    """(sigma, RMS of model(x_sigma, sigma) - the path's end) at every `every`-th level of a teacher's accurate
    trajectory: for a consistency function of that teacher the answer is the end from every level (self-consistency);
    for the teacher's own denoiser it is estimate_travel."""
    levels, states = trajectory["sigmas"], trajectory["x"]
    step = every or max(1, (len(levels) - 1) // 8)
    return [(levels[i], rms(model(states[i], _rows(states[i], levels[i])), trajectory["end"]))
            for i in range(0, len(levels), step)]
