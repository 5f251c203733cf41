"""The continuous view (Song et al. 2021, 'Score-based generative modeling through SDEs'): the VP and VE SDEs as the
limits of lesson 1's schedules (eq. 9 and 11), the reverse-time SDE (eq. 6; Anderson 1982) solved by Euler-Maruyama,
and the probability-flow ODE (eq. 13) with the same marginals.

An SDE here is dx = f(x, t) dt + g(t) dw for t in [0, 1] (0: data); its marginal is x_t = scale(t) x0 + std(t) eps,
which in the samplers' sigma view is x_t / scale(t) = x0 + sigma(t) eps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VPSDE:
    """Variance preserving: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw with beta(t) = beta_min + t (beta_max - beta_min),
    the limit of DDPM's linear betas (beta_i = beta(t) / T: 1e-4 .. 0.02 at T = 1,000 is beta_min 0.1, beta_max 20)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t):
        """log of the signal kept at t: -(integral of beta from 0 to t) = -(beta_min t + (beta_max - beta_min) t^2 / 2)."""
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def scale(self, t):
        return math.exp(0.5 * self.log_alpha_bar(t))

    def std(self, t):
        return math.sqrt(-math.expm1(self.log_alpha_bar(t)))

    def sigma(self, t):
        return self.std(t) / self.scale(t)

    def drift(self, x, t):
        return -0.5 * self.beta(t) * x

    def diffusion(self, t):
        return math.sqrt(self.beta(t))


@dataclass(frozen=True)
class VESDE:
    """Variance exploding: dx = sqrt(d sigma^2 / dt) dw with sigma(t) = sigma_min (sigma_max / sigma_min)^t, the limit of
    Song & Ermon's geometric noise levels (SMLD). x_t = x0 + sigma(t) eps: already the samplers' sigma view."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def scale(self, t):
        return 1.0

    def std(self, t):
        return self.sigma(t)

    def drift(self, x, t):
        return torch.zeros_like(x)

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))


def score_fn(sde, denoiser, **model_kwargs):
    """score(x, t) = grad log p_t(x) of the SDE's state, from a denoiser D(x, sigma): with a = scale(t) and
    sigma = sigma(t), x_t = a (x0 + sigma eps), so the score is (a D(x / a, sigma) - x) / (a sigma)^2 (Tweedie)."""
    def score(x, t):
        a, s = sde.scale(t), sde.sigma(t)
        return (a * denoiser(x / a, s, **model_kwargs) - x) / (a * s) ** 2

    return score


def reverse_drift(sde, score, x, t):
    """The reverse-time SDE's drift f(x, t) - g(t)^2 score(x, t) (Anderson 1982; Song et al. 2021, eq. 6)."""
    return sde.drift(x, t) - sde.diffusion(t) ** 2 * score(x, t)


def pf_ode_drift(sde, score, x, t):
    """The probability-flow ODE dx/dt = f(x, t) - g(t)^2 score(x, t) / 2 (Song et al. 2021, eq. 13): no noise, and
    the same marginals p_t as the SDE (its Fokker-Planck equation is the same)."""
    return sde.drift(x, t) - 0.5 * sde.diffusion(t) ** 2 * score(x, t)


def euler_maruyama_step(x: torch.Tensor, drift: torch.Tensor, diffusion: float, dt: float,
                        noise: torch.Tensor) -> torch.Tensor:
    """One Euler-Maruyama step of dx = drift dt + diffusion dw: x + drift dt + diffusion sqrt(|dt|) z (dt < 0 runs
    time backwards; the Brownian increment's size is sqrt(|dt|) either way)."""
    return x + drift * dt + diffusion * math.sqrt(abs(dt)) * noise


@torch.no_grad()
def sample_reverse_sde(sde, score, x: torch.Tensor, steps: int = 1000, t_end: float = 1e-3,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate the reverse SDE from t = 1 (x ~ the prior) to t_end with `steps` uniform Euler-Maruyama steps."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    ts = torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = euler_maruyama_step(x, reverse_drift(sde, score, x, t), sde.diffusion(t), t_next - t, z)
    return x


@torch.no_grad()
def solve_pf_ode(sde, score, x: torch.Tensor, t_from: float = 1.0, t_to: float = 1e-3, rtol: float = 1e-6,
                 atol: float = 1e-6) -> tuple[torch.Tensor, int]:
    """The probability-flow ODE from t_from to t_to by scipy's adaptive RK45 (a solver that knows nothing of
    diffusion): the reference lesson 3's samplers are measured against. Returns the end point and the evaluations."""
    import numpy as np
    from scipy.integrate import solve_ivp

    shape, dtype, calls = x.shape, x.dtype, [0]

    def rhs(t, y):
        calls[0] += 1
        xt = torch.from_numpy(y.reshape(shape)).to(dtype)
        return pf_ode_drift(sde, score, xt, float(t)).double().flatten().numpy()

    sol = solve_ivp(rhs, (t_from, t_to), x.double().flatten().numpy(), method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"the ODE solver failed: {sol.message}")
    return torch.from_numpy(np.ascontiguousarray(sol.y[:, -1]).reshape(shape)).to(dtype), calls[0]
