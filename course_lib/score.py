"""Scores and Langevin dynamics: the score of noised data from any denoiser (Tweedie's formula: Efron 2011; Vincent
2011), denoising score matching (Vincent 2011, eq. 11; Song & Ermon 2019, eq. 2), Langevin sampling (Roberts & Tweedie
1996) and annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1)."""
from __future__ import annotations

import math

import torch


def score_from_denoiser(denoiser, x: torch.Tensor, sigma: float, **model_kwargs) -> torch.Tensor:
    """grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Tweedie): a denoiser is a score model, and back."""
    return (denoiser(x, sigma, **model_kwargs) - x) / (sigma * sigma)


def mixture_score(mixture, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """The exact score of an equal-weight isotropic mixture smoothed by N(0, sigma^2 I): sum_k r_k(x) (mu_k - x) / v,
    v = std^2 + sigma^2, r_k the posterior probability of mode k (sigma = 0: the data's own score)."""
    v = float(mixture.std) ** 2 + float(sigma) ** 2
    modes = mixture.modes.to(x.device, x.dtype)
    diff = modes[None] - x[:, None, :]                        # (B, K, 2)
    r = torch.softmax(-(diff**2).sum(-1) / (2 * v), dim=1)    # (B, K)
    return (r[..., None] * diff).sum(1) / v


def dsm_loss(score_model, x0: torch.Tensor, sigma, generator: torch.Generator | None = None,
             **model_kwargs) -> torch.Tensor:
    """Denoising score matching with Song & Ermon's weight sigma^2: E || sigma s(x0 + sigma eps, sigma) + eps ||^2.
    The regression target of s is -eps / sigma, the score of q(x_sigma | x0); its minimiser is the score of p_sigma.
    sigma: a number or one per row (B,)."""
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    s = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    s_b = s.reshape(-1, *([1] * (x0.ndim - 1))) if s.ndim == 1 else s
    pred = score_model(x0 + s_b * eps, s)
    return ((s_b * pred + eps) ** 2).flatten(1).sum(1).mean()


@torch.no_grad()
def langevin(score_fn, x: torch.Tensor, step_size: float, steps: int, generator: torch.Generator | None = None,
             keep_every: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Unadjusted Langevin dynamics x <- x + (step/2) score(x) + sqrt(step) z: samples p as step -> 0 and
    steps -> infinity (Roberts & Tweedie 1996). With keep_every = k, also the states every k steps, (K, B, ...)."""
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    kept = [x.clone()] if keep_every else None
    for i in range(steps):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = x + 0.5 * step_size * score_fn(x) + math.sqrt(step_size) * z
        if keep_every and (i + 1) % keep_every == 0:
            kept.append(x.clone())
    return (x, torch.stack(kept)) if keep_every else x


@torch.no_grad()
def annealed_langevin(score_fn, x: torch.Tensor, sigmas, steps_per_level: int = 100, eps: float = 2e-5,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1): Langevin at each noise level of the decreasing
    `sigmas` in turn, with step eps * sigma_i^2 / sigma_L^2; score_fn(x, sigma) is the score of p_sigma."""
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 1 or any(s <= 0 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError("sigmas must be positive and strictly decreasing")
    for s in sigmas:
        step = eps * s * s / (sigmas[-1] ** 2)
        x = langevin(lambda z, s=s: score_fn(z, s), x, step, steps_per_level, generator)
    return x


def geometric_sigmas(n: int, sigma_max: float, sigma_min: float) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min with a constant ratio (Song & Ermon 2019, sec. 4.2)."""
    if not isinstance(n, int) or n < 1 or not 0 < sigma_min <= sigma_max:
        raise ValueError("need a positive int n and 0 < sigma_min <= sigma_max")
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n, dtype=torch.float64)


def mode_switches(path: torch.Tensor, mixture) -> float:
    """Share of chains whose nearest mode at the end differs from the one at the start, path of shape (K, B, 2)."""
    from .metrics import nearest_mode

    return float((nearest_mode(path[0], mixture)[0] != nearest_mode(path[-1], mixture)[0]).float().mean())
