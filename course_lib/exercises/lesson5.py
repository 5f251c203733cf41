"""Lesson 5: DPM-Solver++(2M)'s update as the coefficients of one fused linear combination."""
from __future__ import annotations

import math

import torch

from . import Exercise, register
from .common import SAMPLER_LIBRARIES, SAMPLER_RULE


def ref_dpmpp_2m_coefficients(sigma, sigma_next, sigma_prev):
    """(a, b, c) with x_next = a x + b D + c D_prev: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) as one fused pass."""
    h = math.log(sigma) - math.log(sigma_next)
    r = (math.log(sigma_prev) - math.log(sigma)) / h
    k = -math.expm1(-h)
    return torch.tensor([sigma_next / sigma, k * (1 + 1 / (2 * r)), -k / (2 * r)], dtype=torch.float64)


def _inputs_dpmpp(gen):
    s = float(torch.rand(1, generator=gen)) * 20 + 0.05
    return {"sigma": s, "sigma_next": s * (float(torch.rand(1, generator=gen)) * 0.8 + 0.1),
            "sigma_prev": s * (float(torch.rand(1, generator=gen)) * 3 + 1.1)}


register(Exercise(
    "dpmpp_2m_coefficients", 5, ref_dpmpp_2m_coefficients, _inputs_dpmpp,
    "With h = log(sigma / sigma_next) and r = log(sigma_prev / sigma) / h: x_next = (sigma_next / sigma) x - "
    "expm1(-h) ((1 + 1 / (2r)) D - D_prev / (2r)). Return the three numbers multiplying x, D and D_prev.",
    mistakes=((lambda sigma, sigma_next, sigma_prev: ref_dpmpp_2m_coefficients(sigma, sigma_next, sigma_prev)
               * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64),
               "-expm1(-h) = 1 - sigma_next / sigma is positive: the D terms add, weighted by it."),
              (lambda sigma, sigma_next, sigma_prev: torch.tensor(
                  [sigma_next / sigma, 1 - sigma_next / sigma, 0.0], dtype=torch.float64),
               "That is the first-order step (DDIM): add the correction with the previous D, weighted by 1 / (2r)."),
              (lambda sigma, sigma_next, sigma_prev: torch.tensor(
                  [sigma / sigma_next, 1 - sigma_next / sigma, 0.0], dtype=torch.float64),
               "x is scaled by sigma_next / sigma (< 1): the noise shrinks."),
              (lambda sigma, sigma_next, sigma_prev: ref_dpmpp_2m_coefficients(
                  sigma, sigma_next, sigma * math.exp((math.log(sigma) - math.log(sigma_next)) ** 2
                                                      / (math.log(sigma_prev) - math.log(sigma)))),
               "r is the previous step over this one, r = h_prev / h, not its inverse.")),
    refused=SAMPLER_LIBRARIES, rule=SAMPLER_RULE))
