"""Lesson 3, graded on values: a DDIM step, a Heun step, the Karras noise levels."""
from __future__ import annotations

import torch

from ..grading.toys import ToyDenoiser as _ToyDenoiser
from . import Exercise, register
from .common import SAMPLER_LIBRARIES, SAMPLER_RULE, _batch


def ref_ddim_step(x_t, x0_pred, ab_t, ab_s):
    """Deterministic DDIM step t -> s (Song et al. 2021, eq. 12 with sigma = 0): keep the implied noise, move x0's share."""
    eps = (x_t - ab_t**0.5 * x0_pred) / (1 - ab_t) ** 0.5
    return ab_s**0.5 * x0_pred + (1 - ab_s) ** 0.5 * eps


def _inputs_ddim_step(gen):
    _, shape = _batch(gen)
    ab_t = float(torch.rand(1, generator=gen)) * 0.9 + 0.01
    ab_s = ab_t + (1 - ab_t) * float(torch.rand(1, generator=gen)) * 0.9
    return {"x_t": torch.randn(shape, generator=gen), "x0_pred": torch.randn(shape, generator=gen).clamp(-1, 1),
            "ab_t": ab_t, "ab_s": ab_s}


register(Exercise(
    "ddim_step", 3, ref_ddim_step, _inputs_ddim_step,
    "First recover the noise the model implies: eps = (x_t - sqrt(ab_t) x0_pred) / sqrt(1 - ab_t); "
    "then rebuild x_s = sqrt(ab_s) x0_pred + sqrt(1 - ab_s) eps.",
    mistakes=((lambda x_t, x0_pred, ab_t, ab_s: ab_s**0.5 * x0_pred + (1 - ab_s) ** 0.5 * x_t,
               "x_t is not the noise: recover eps from x_t and x0_pred first."),
              (lambda x_t, x0_pred, ab_t, ab_s: ab_s * x0_pred + (1 - ab_s) * (x_t - ab_t * x0_pred) / (1 - ab_t),
               "alpha-bar is a variance: use square roots, sqrt(ab) and sqrt(1 - ab)."),
              (lambda x_t, x0_pred, ab_t, ab_s: x0_pred, "Return x_s, the next noisy state, not the x0 estimate.")),
    refused=SAMPLER_LIBRARIES, rule=SAMPLER_RULE))


def ref_heun_step(denoise, x, sigma, sigma_next):
    """One Heun step sigma -> sigma_next > 0 on dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Algorithm 1)."""
    d = (x - denoise(x, sigma)) / sigma
    x_euler = x + (sigma_next - sigma) * d
    d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
    return x + (sigma_next - sigma) * (d + d_next) / 2


def _inputs_heun_step(gen):
    _, shape = _batch(gen)
    w = float(torch.rand(1, generator=gen)) + 0.5
    sigma = float(torch.rand(1, generator=gen)) * 5 + 0.5
    sigma_next = sigma * (float(torch.rand(1, generator=gen)) * 0.7 + 0.1)

    return {"denoise": _ToyDenoiser(w), "x": torch.randn(shape, generator=gen) * (1 + sigma), "sigma": sigma,
            "sigma_next": sigma_next}


def _heun_second_slope(denoise, x, sigma, sigma_next):
    x_euler = x + (sigma_next - sigma) * (x - denoise(x, sigma)) / sigma
    return (x_euler - denoise(x_euler, sigma_next)) / sigma_next


register(Exercise(
    "heun_step", 3, ref_heun_step, _inputs_heun_step,
    "Slope d = (x - denoise(x, sigma)) / sigma; Euler guess x' = x + (sigma_next - sigma) d; slope d' at "
    "(x', sigma_next); result x + (sigma_next - sigma) (d + d') / 2.",
    mistakes=((lambda denoise, x, sigma, sigma_next: x + (sigma_next - sigma) * (x - denoise(x, sigma)) / sigma,
               "That is Euler's step: correct it with the slope at the Euler guess, and average the two slopes."),
              (lambda denoise, x, sigma, sigma_next: x + (sigma_next - sigma) * (
                  (x - denoise(x, sigma)) / sigma + (x - denoise(x, sigma_next)) / sigma_next) / 2,
               "Evaluate the second slope at the Euler guess x', not at the starting point x."),
              (_heun_second_slope,
               "Return the new state x + (sigma_next - sigma) (d + d') / 2, not the second slope.")),
    refused=SAMPLER_LIBRARIES, rule=SAMPLER_RULE))


def ref_karras_sigmas(n, sigma_min, sigma_max, rho):
    """n levels from sigma_max to sigma_min evenly spaced in sigma^(1/rho), then a final 0 (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def _inputs_karras(gen):
    return {"n": int(torch.randint(2, 40, (1,), generator=gen)), "sigma_min": float(torch.rand(1, generator=gen)) * 0.05 + 0.002,
            "sigma_max": float(torch.rand(1, generator=gen)) * 100 + 1, "rho": float(torch.randint(1, 10, (1,), generator=gen))}


register(Exercise(
    "karras_sigmas", 3, ref_karras_sigmas, _inputs_karras,
    "Space n points evenly between sigma_max^(1/rho) and sigma_min^(1/rho), raise them to the power rho, "
    "then append a 0: n + 1 values, largest first.",
    mistakes=((lambda n, sigma_min, sigma_max, rho: torch.cat([torch.linspace(sigma_max, sigma_min, n, dtype=torch.float64),
                                                              torch.zeros(1, dtype=torch.float64)]),
               "Space the points evenly in sigma^(1/rho), not in sigma: take the rho-th root first, the rho-th power after."),
              (lambda n, sigma_min, sigma_max, rho: ref_karras_sigmas(n, sigma_min, sigma_max, rho).flip(0),
               "Largest first: a sampler runs from sigma_max down to 0.")),
    refused=SAMPLER_LIBRARIES, rule=SAMPLER_RULE))
