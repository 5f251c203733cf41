"""Exact log-likelihoods by the probability-flow ODE: the instantaneous change of variables (Chen et al. 2018, Theorem 1;
Song et al. 2021, sec. 4.3 and app. D.2), with the exact trace in low dimension or Hutchinson's estimator (Grathwohl et
al. 2019, FFJORD, eq. 7).

In the samplers' sigma view, with u = log sigma, the ODE is dx/du = x - D(x, sigma). Carried from the data (sigma near
0) to the top of the model's range, log p_0(x) = log p_top(x_top) + integral of div(x - D) du = log prior(x_top) +
integral of (d - tr dD/dx) du. Works for any model the samplers take (diffusion or flow matching: course_lib.flow).
"""
from __future__ import annotations

import math

import numpy as np
import torch

SIGMA_LO = 1e-4  # where the integral starts: below it the ODE moves x by ~sigma^2 times the score, negligible


def log_normal(x: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; 0, std^2 I) per row, summed over the other dimensions, in nats."""
    d = x[0].numel()
    return -0.5 * (x.flatten(1).double() ** 2).sum(1) / std**2 - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)


def divergence_exact(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x) and its exact divergence sum_i d fn_i / d x_i per row, by one backward pass per dimension (2D data)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(x)
        flat, xin = out.flatten(1), x
        div = torch.zeros(x.shape[0], dtype=out.dtype, device=x.device)
        for i in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, i].sum(), xin, retain_graph=i < flat.shape[1] - 1)
            div = div + g.flatten(1)[:, i]
    return out.detach(), div.detach()


def divergence_hutchinson(fn, x: torch.Tensor, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x) and Hutchinson's unbiased estimate of its divergence, probe^T (d fn / dx) probe, one backward pass
    (Hutchinson 1989; Grathwohl et al. 2019): the probe is Rademacher (+-1), fixed along a trajectory."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(x)
        (g,) = torch.autograd.grad(out, x, grad_outputs=probe)
    return out.detach(), (g * probe).flatten(1).sum(1).detach()


def _drift(den, sigma: float, model_kwargs: dict):
    """x -> D(x, sigma). A diffusion network never saw noise below its schedule's first step (sigma_min): there its
    score (D - x) / sigma^2 is held at sigma_min's (the score of data smoothed by a tiny sigma barely changes), so the
    integral can start under that range. A flow network was trained on every t down to 0 and is used as it is."""
    if sigma >= den.sigma_min or den.path == "linear":
        return lambda x: den(x, sigma, **model_kwargs)
    s0 = den.sigma_min
    return lambda x: x + (sigma / s0) ** 2 * (den(x, s0, **model_kwargs) - x)


def ode_log_likelihood(model, x0: torch.Tensor, schedule=None, prediction: str | None = None, trace: str = "auto",
                       sigma_lo: float = SIGMA_LO, sigma_hi: float | None = None, prior=None, rtol: float = 1e-5,
                       atol: float = 1e-5, seed: int = 0, model_kwargs: dict | None = None) -> dict:
    """log p(x0) under the model's probability-flow ODE, per row, in nats (the model: anything samplers.sample takes).

    trace: 'exact' (one backward pass per dimension), 'hutchinson' (one pass, a Rademacher probe per row drawn from
    `seed`; unbiased for the divergence, so the log-likelihood is unbiased but each row is noisy), or 'auto' (exact up
    to 4 dimensions). The ODE runs from sigma_lo to sigma_hi (default: the top of the model's range) with scipy's
    adaptive RK45 at rtol / atol. prior(x, sigma) is the log-density at the top; by default the model's own prior,
    N(0, prior_std(sigma)^2 I), which is where its samplers start.

    Returns log_p, nll (= -log_p), prior (its log-density at the end point) and delta (the integral), all (B,)
    float64, plus nfe (model evaluations) and the end point x_top.
    """
    from scipy.integrate import solve_ivp

    from .samplers import as_denoiser

    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor, got {type(x0).__name__}")
    den = as_denoiser(model, schedule, prediction)
    sigma_hi = float(sigma_hi or den.sigma_max)
    if not 0 < sigma_lo < sigma_hi:
        raise ValueError(f"need 0 < sigma_lo < sigma_hi, got {sigma_lo} and {sigma_hi}")
    dims = x0[0].numel()
    if trace == "auto":
        trace = "exact" if dims <= 4 else "hutchinson"
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace must be 'exact', 'hutchinson' or 'auto', got {trace!r}")
    model_kwargs = model_kwargs or {}
    b, shape, device = x0.shape[0], x0.shape, x0.device
    params = getattr(model, "parameters", None)  # a network computes in its own dtype (float32 for the shipped ones)
    first = next(iter(params()), None) if callable(params) else None
    dtype = first.dtype if first is not None else x0.dtype
    probe = None
    if trace == "hutchinson":
        g = torch.Generator().manual_seed(seed)
        probe = (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(device, dtype)
    calls = [0]

    def rhs(u, state):
        calls[0] += 1
        sigma = math.exp(u)
        x = torch.from_numpy(state[: b * dims].reshape(shape)).to(device, dtype)
        drift = _drift(den, sigma, model_kwargs)
        d, tr = divergence_exact(drift, x) if probe is None else divergence_hutchinson(drift, x, probe)
        dx = (x - d).flatten().double().cpu().numpy()
        return np.concatenate([dx, (dims - tr).double().cpu().numpy()])

    state0 = np.concatenate([x0.detach().double().cpu().flatten().numpy(), np.zeros(b)])
    sol = solve_ivp(rhs, (math.log(sigma_lo), math.log(sigma_hi)), state0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"the ODE solver failed: {sol.message}")
    end = sol.y[:, -1]
    x_top = torch.from_numpy(end[: b * dims].reshape(shape))
    delta = torch.from_numpy(end[b * dims:])
    log_prior = prior(x_top, sigma_hi) if prior is not None else log_normal(x_top, den.prior_std(sigma_hi))
    log_p = log_prior.double() + delta
    return {"log_p": log_p, "nll": -log_p, "prior": log_prior, "delta": delta, "nfe": calls[0], "x_top": x_top}


def bits_per_dim(nll: torch.Tensor, dims: int, levels: int | None = None, low: float = -1.0, high: float = 1.0):
    """Nats per data point -> bits per dimension. With `levels` (discrete data on evenly spaced values in [low, high],
    evaluated at uniformly dequantised points x + u, u ~ U(-bin/2, bin/2)), the bound on the discrete data's NLL:
    -log P(x) <= E_u[-log p(x + u)] - dims * log(bin) (Theis et al. 2016, sec. 3.1)."""
    nll = torch.as_tensor(nll, dtype=torch.float64)
    if levels is not None:
        if not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be an int >= 2, got {levels!r}")
        nll = nll - dims * math.log((high - low) / (levels - 1))
    return nll / (dims * math.log(2))


def dequantise(x: torch.Tensor, levels: int, generator: torch.Generator | None = None, low: float = -1.0,
               high: float = 1.0) -> torch.Tensor:
    """x plus uniform noise over its grey level's bin (width (high - low) / (levels - 1)): a continuous density's input."""
    width = (high - low) / (levels - 1)
    return x + (torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device) - 0.5) * width
