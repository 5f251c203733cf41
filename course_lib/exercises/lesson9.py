"""Lesson 9, graded on values: denoising score matching, an Euler-Maruyama step of the reverse SDE, the flow-matching
loss, and the ODE log-likelihood of a 2D flow with the exact trace."""
from __future__ import annotations

import math

import torch

from ..grading.toys import ToyVelocity
from . import LIBRARY_EQUIVALENTS, Exercise, register
from .common import ODE_LIBRARIES, ODE_RULE


def ref_dsm_loss(score_pred, eps, sigma):
    """Denoising score matching with the weight sigma^2 (Song & Ermon 2019, eq. 2): the score's target at
    x = x0 + sigma eps is -eps / sigma, so sigma^2 || s + eps / sigma ||^2 = || sigma s + eps ||^2, summed over the
    dimensions and averaged over the batch. sigma has one value per row (B,)."""
    s = sigma.reshape(-1, *([1] * (eps.ndim - 1)))
    return ((s * score_pred + eps) ** 2).flatten(1).sum(1).mean()


def _inputs_dsm(gen):
    b, d = int(torch.randint(3, 9, (1,), generator=gen)), int(torch.randint(2, 6, (1,), generator=gen))
    return {"score_pred": 3 * torch.randn(b, d, generator=gen, dtype=torch.float64),
            "eps": torch.randn(b, d, generator=gen, dtype=torch.float64),
            "sigma": torch.rand(b, generator=gen, dtype=torch.float64) * 2 + 0.1}


def ref_reverse_sde_step(x, score, beta, dt, noise):
    """One Euler-Maruyama step of the reverse VP SDE (Song et al. 2021, eq. 6) with dt < 0: the drift is
    f - g^2 score = -beta x / 2 - beta score, the diffusion g = sqrt(beta), the Brownian increment sqrt(|dt|) noise."""
    return x + (-0.5 * beta * x - beta * score) * dt + math.sqrt(beta * abs(dt)) * noise


def _inputs_em(gen):
    b, d = int(torch.randint(2, 7, (1,), generator=gen)), int(torch.randint(2, 5, (1,), generator=gen))
    f = dict(generator=gen, dtype=torch.float64)
    return {"x": torch.randn(b, d, **f), "score": torch.randn(b, d, **f),
            "beta": float(torch.rand(1, generator=gen)) * 19 + 0.5, "dt": -float(torch.rand(1, generator=gen)) * 0.05 - 1e-3,
            "noise": torch.randn(b, d, **f)}


def ref_flow_matching_loss(velocity_pred, x0, noise):
    """The conditional flow-matching loss (Lipman et al. 2023, eq. 23) on the straight path x_t = (1 - t) x0 + t noise:
    the target is its velocity noise - x0; the loss is the mean squared error over every element."""
    return ((velocity_pred - (noise - x0)) ** 2).mean()


def _inputs_fm(gen):
    b, d = int(torch.randint(3, 9, (1,), generator=gen)), int(torch.randint(2, 6, (1,), generator=gen))
    f = dict(generator=gen, dtype=torch.float64)
    return {"velocity_pred": torch.randn(b, d, **f), "x0": torch.randn(b, d, **f), "noise": torch.randn(b, d, **f)}


def _log_likelihood(velocity, x, steps, method="rk4", trace_sign=1.0, prior=True, diagonal=(0, 1)):
    def div(z, t):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            v = velocity(z, t)
            tr = sum(torch.autograd.grad(v[:, i].sum(), z, retain_graph=True)[0][:, i] for i in diagonal)
        return v.detach(), tr.detach()

    def f(z, t):
        v, tr = div(z, t)
        return v, trace_sign * tr

    h, z, delta = 1.0 / steps, x.detach().clone(), torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(steps):
        t = i * h
        if method == "euler":
            v, tr = f(z, t)
            z, delta = z + h * v, delta + h * tr
            continue
        k1, l1 = f(z, t)
        k2, l2 = f(z + h / 2 * k1, t + h / 2)
        k3, l3 = f(z + h / 2 * k2, t + h / 2)
        k4, l4 = f(z + h * k3, t + h)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        delta = delta + h / 6 * (l1 + 2 * l2 + 2 * l3 + l4)
    log_prior = -0.5 * (z**2).sum(1) - math.log(2 * math.pi) if prior else 0.0
    return log_prior + delta


def ref_ode_log_likelihood(velocity, x, steps):
    """log p(x) of a 2D flow dx/dt = velocity(x, t) that carries data (t = 0) to N(0, I) (t = 1), by the
    instantaneous change of variables (Chen et al. 2018): log p_0(x_0) = log N(x_1; 0, I) + integral from 0 to 1 of
    tr(d velocity / dx)(x_t, t) dt, integrated with `steps` steps of the classical 4th-order Runge-Kutta method on the
    pair (x, integral), the trace exact (both diagonal entries of the 2 x 2 Jacobian, by autograd)."""
    return _log_likelihood(velocity, x, steps)


def _inputs_ll(gen):
    f = dict(generator=gen, dtype=torch.float64)
    h = 16
    velocity = ToyVelocity(torch.randn(h, 2, **f), 0.5 * torch.randn(h, **f), torch.randn(h, **f),
                           0.4 * torch.randn(2, h, **f))
    return {"velocity": velocity, "x": 1.5 * torch.randn(int(torch.randint(4, 12, (1,), generator=gen)), 2, **f),
            "steps": int(torch.randint(8, 16, (1,), generator=gen))}


register(Exercise(
    "dsm_loss", 9, ref_dsm_loss, _inputs_dsm,
    "Reshape sigma to (B, 1), form sigma * score_pred + eps, square, sum over the data dimensions, average over the "
    "batch.",
    mistakes=((lambda score_pred, eps, sigma: ((score_pred + eps) ** 2).sum(1).mean(),
               "Weight by sigma: the target of the score is -eps / sigma, so the residual is sigma * score + eps."),
              (lambda score_pred, eps, sigma: ((sigma[:, None] * score_pred - eps) ** 2).sum(1).mean(),
               "The score points back towards the data, against the noise: its target is -eps / sigma (so + eps)."),
              (lambda score_pred, eps, sigma: ((sigma[:, None] * score_pred + eps) ** 2).mean(),
               "Sum over the data dimensions, then average over the batch (the mean over every element divides by "
               "the dimension too)."),
              (lambda score_pred, eps, sigma: ((score_pred + eps / sigma[:, None]) ** 2).sum(1).mean(),
               "Use the weight sigma^2 (Song & Ermon's): the unweighted loss blows up as sigma -> 0.")),
    rtol=1e-6, atol=1e-9))
register(Exercise(
    "reverse_sde_step", 9, ref_reverse_sde_step, _inputs_em,
    "drift = -0.5 * beta * x - beta * score (f - g^2 score with g^2 = beta); "
    "return x + drift * dt + sqrt(beta * |dt|) * noise. dt is negative: time runs backwards.",
    mistakes=((lambda x, score, beta, dt, noise: x + (-0.5 * beta * x - 0.5 * beta * score) * dt
               + math.sqrt(beta * abs(dt)) * noise,
               "That half is the probability-flow ODE's: the reverse SDE subtracts the full g^2 * score."),
              (lambda x, score, beta, dt, noise: x + (-0.5 * beta * x + beta * score) * dt
               + math.sqrt(beta * abs(dt)) * noise,
               "The reverse drift is f - g^2 score: minus the score term (with dt < 0 it pushes x up the score)."),
              (lambda x, score, beta, dt, noise: x + (-0.5 * beta * x - beta * score) * dt + beta * abs(dt) * noise,
               "The Brownian increment has size sqrt(|dt|), and the diffusion g = sqrt(beta): sqrt(beta |dt|)."),
              (lambda x, score, beta, dt, noise: x + (-0.5 * beta * x - beta * score) * dt,
               "An SDE step adds noise: + sqrt(beta * |dt|) * noise.")),
    rtol=1e-6, atol=1e-9))
register(Exercise(
    "flow_matching_loss", 9, ref_flow_matching_loss, _inputs_fm,
    "The target is noise - x0 (the velocity of x_t = (1 - t) x0 + t noise); return ((velocity_pred - target)^2).mean().",
    mistakes=((lambda velocity_pred, x0, noise: ((velocity_pred - (x0 - noise)) ** 2).mean(),
               "t = 0 is the data and t = 1 the noise, so d x_t / dt = noise - x0."),
              (lambda velocity_pred, x0, noise: ((velocity_pred - noise) ** 2).mean(),
               "Predicting the noise is diffusion's eps target; the velocity is noise - x0."),
              (lambda velocity_pred, x0, noise: ((velocity_pred - (noise - x0)) ** 2).sum(1).mean(),
               "Average over every element (the mean squared error), as the lesson's loss does.")),
    rtol=1e-6, atol=1e-9))
register(Exercise(
    "ode_log_likelihood", 9, ref_ode_log_likelihood, _inputs_ll,
    "Carry the pair (z, delta) from t = 0 (z = x, delta = 0) to t = 1 with `steps` RK4 steps of size h = 1 / steps; "
    "at each stage evaluate v = velocity(z, t) and tr = d v_0 / d z_0 + d v_1 / d z_1 (autograd: the gradient of "
    "v[:, i].sum() with respect to z, column i). Return log N(z_1; 0, I) + delta, where log N(z; 0, I) = "
    "-|z|^2 / 2 - log(2 pi) in 2D.",
    mistakes=((lambda velocity, x, steps: _log_likelihood(velocity, x, steps, trace_sign=-1.0),
               "Add the integral of the trace: the density falls where the flow spreads points out, "
               "log p_0(x_0) = log p_1(x_1) + integral of tr(dv/dx) dt."),
              (lambda velocity, x, steps: _log_likelihood(velocity, x, steps, prior=False),
               "Add the prior's log-density at the end point, log N(z_1; 0, I)."),
              (lambda velocity, x, steps: _log_likelihood(velocity, x, steps, method="euler"),
               "Use the 4th-order Runge-Kutta method (4 stages per step) as asked: Euler with so few steps is far off."),
              (lambda velocity, x, steps: _log_likelihood(velocity, x, steps, diagonal=(0,)),
               "The trace sums both diagonal entries of the 2 x 2 Jacobian."),
              (lambda velocity, x, steps: -0.5 * (x**2).sum(1) - math.log(2 * math.pi),
               "Integrate the ODE: the prior is the density at t = 1, not at the data.")),
    refused=ODE_LIBRARIES, rule=ODE_RULE, rtol=1e-5, atol=1e-7, points=3))
LIBRARY_EQUIVALENTS.update({
    "dsm_loss": ("course_lib.score.dsm_loss",),
    "reverse_sde_step": ("course_lib.sde.euler_maruyama_step", "course_lib.sde.reverse_drift",
                         "course_lib.sde.sample_reverse_sde"),
    "flow_matching_loss": ("course_lib.flow.flow_matching_loss", "course_lib.flow.velocity_target"),
    "ode_log_likelihood": ("course_lib.likelihood.ode_log_likelihood", "course_lib.likelihood.divergence_exact"),
})
