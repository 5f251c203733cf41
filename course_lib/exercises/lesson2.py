"""Lesson 2, graded on values: the simple loss, the true posterior's mean, eps to x0."""
from __future__ import annotations

import torch

from .. import losses, schedules
from ..grading.toys import ToyNetwork as _ToyNetwork
from . import Exercise, register
from .common import _RESHAPE_HINT, DIFFUSION_LIBRARIES, DIFFUSION_RULE, _batch, _per_sample
from .lesson01 import ref_q_sample


def _inputs_schedule_batch(gen, t_min: int = 0):
    b, shape = _batch(gen)
    T = int(torch.randint(20, 200, (1,), generator=gen))
    betas = torch.linspace(1e-4, 0.05, T, dtype=torch.float64) * (0.5 + torch.rand(1, generator=gen).double())
    return b, shape, T, {"t": torch.randint(t_min, T, (b,), generator=gen),
                         "alpha_bar": schedules.alpha_bar_from_betas(betas).float()}


def ref_simple_loss(model, x0, t, noise, alpha_bar):
    """L_simple = mean ||noise - model(x_t, t)||^2 with x_t from q(x_t | x0) (Ho et al. 2020, eq. 14)."""
    return ((noise - model(ref_q_sample(x0, t, alpha_bar, noise), t)) ** 2).mean()


def _inputs_simple_loss(gen):
    b, shape, T, d = _inputs_schedule_batch(gen)
    return {"model": _ToyNetwork(0.5 + torch.rand(1, generator=gen).item(), T),
            "x0": torch.rand(shape, generator=gen) * 2 - 1, "noise": torch.randn(shape, generator=gen), **d}


register(Exercise(
    "simple_loss", 2, ref_simple_loss, _inputs_simple_loss,
    "Noise x0 to x_t with the closed form (your q_sample from lesson 1), ask model(x_t, t) for the noise, and "
    "return the mean squared error against the true noise, averaged over every element: a scalar.",
    mistakes=((lambda model, x0, t, noise, alpha_bar: ((x0 - model(ref_q_sample(x0, t, alpha_bar, noise), t)) ** 2).mean(),
               "The network predicts the noise: compare with `noise`, not with x0."),
              (lambda model, x0, t, noise, alpha_bar: ((noise - model(x0, t)) ** 2).mean(),
               "The network sees the noised x_t, not the clean x0."),
              (lambda model, x0, t, noise, alpha_bar: ((noise - model(ref_q_sample(x0, t, alpha_bar, noise), t)) ** 2).sum(),
               "Average over all elements (.mean()), do not sum: the scale must not depend on the batch or image size."),
              (lambda model, x0, t, noise, alpha_bar: (noise - model(ref_q_sample(x0, t, alpha_bar, noise), t)).abs().mean(),
               "Square the error: the ELBO gives a squared error, not an absolute one.")),
    refused=DIFFUSION_LIBRARIES, rule=DIFFUSION_RULE))


def ref_posterior_mean(x0, x_t, t, alpha_bar):
    """Mean of q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 7), with alpha_bar_{-1} = 1 at our t = 0."""
    ab = alpha_bar.double()
    coef_x0, coef_xt, _ = losses.posterior_coefficients(ab, torch.cat([ab.new_ones(1), ab[:-1]]))
    return (_per_sample(coef_x0[t], x0) * x0 + _per_sample(coef_xt[t], x0) * x_t).to(x0.dtype)


def _inputs_posterior_mean(gen):
    b, shape, T, d = _inputs_schedule_batch(gen)
    if b > 3:
        d["t"][0] = 0  # always test the first step, where alpha_bar_prev = 1
    return {"x0": torch.rand(shape, generator=gen) * 2 - 1, "x_t": torch.randn(shape, generator=gen), **d}


def _posterior_mistake(coefs):
    def wrong(x0, x_t, t, alpha_bar):
        ab = alpha_bar.double()
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        beta = 1 - ab / ab_prev
        a_t, a_p, b_t = (_per_sample(v[t], x0) for v in (ab, ab_prev, beta))
        c0, ct = coefs(a_t, a_p, b_t)
        return (c0 * x0 + ct * x_t).to(x0.dtype)
    return wrong


register(Exercise(
    "posterior_mean", 2, ref_posterior_mean, _inputs_posterior_mean,
    "mean = sqrt(ab_prev) beta_t / (1 - ab_t) * x0 + sqrt(alpha_t) (1 - ab_prev) / (1 - ab_t) * x_t, where "
    "ab_prev = alpha_bar[t-1] (and 1 when t = 0), alpha_t = alpha_bar[t] / ab_prev and beta_t = 1 - alpha_t. "
    + _RESHAPE_HINT,
    mistakes=((_posterior_mistake(lambda a_t, a_p, b_t: ((1 - b_t).sqrt() * (1 - a_p) / (1 - a_t),
                                                         a_p.sqrt() * b_t / (1 - a_t))),
               "The two coefficients are swapped: x0 gets sqrt(ab_prev) beta_t / (1 - ab_t)."),
              (_posterior_mistake(lambda a_t, a_p, b_t: (a_p * b_t / (1 - a_t), (1 - b_t) * (1 - a_p) / (1 - a_t))),
               "Take square roots of ab_prev and of alpha_t in the coefficients."),
              (lambda x0, x_t, t, alpha_bar: ref_posterior_mean(x0, x_t, t, torch.cat([alpha_bar[1:], alpha_bar[-1:]])),
               "Off by one: ab_t is alpha_bar[t] and ab_prev is alpha_bar[t-1] (1 at t = 0)."),
              (_posterior_mistake(lambda a_t, a_p, b_t: (a_p.sqrt() * b_t / (1 - a_t), (1 - a_p) / (1 - a_t))),
               "x_t's coefficient has a factor sqrt(alpha_t) = sqrt(1 - beta_t).")),
    rtol=1e-4, atol=2e-4,
    refused=DIFFUSION_LIBRARIES, rule=DIFFUSION_RULE))  # float32 inputs: 1 - alpha_bar loses digits near t = 0 (seen: 6.6e-5 apart)


def ref_eps_to_x0(eps, x_t, t, alpha_bar):
    """x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (Ho et al. 2020, eq. 15)."""
    ab = _per_sample(alpha_bar[t], x_t).to(x_t.dtype)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def _inputs_eps_to_x0(gen):
    b, shape, T, d = _inputs_schedule_batch(gen)
    return {"eps": torch.randn(shape, generator=gen), "x_t": torch.randn(shape, generator=gen), **d}


register(Exercise(
    "eps_to_x0", 2, ref_eps_to_x0, _inputs_eps_to_x0,
    "Solve x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps for x0. " + _RESHAPE_HINT,
    mistakes=((lambda eps, x_t, t, alpha_bar: x_t - _per_sample((1 - alpha_bar[t]).sqrt(), x_t) * eps,
               "After subtracting the noise, divide by sqrt(alpha_bar_t)."),
              (lambda eps, x_t, t, alpha_bar: (x_t - _per_sample(1 - alpha_bar[t], x_t) * eps) / _per_sample(alpha_bar[t], x_t),
               "Use the square roots: sqrt(1 - alpha_bar_t) and sqrt(alpha_bar_t)."),
              (lambda eps, x_t, t, alpha_bar: (x_t + _per_sample((1 - alpha_bar[t]).sqrt(), x_t) * eps)
               / _per_sample(alpha_bar[t].sqrt(), x_t),
               "Subtract the noise term; do not add it.")),
    refused=DIFFUSION_LIBRARIES, rule=DIFFUSION_RULE))
