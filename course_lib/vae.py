"""The VAE objective (lesson 4): the reparameterization trick, the KL term and the ELBO (network: course_lib.nets.vae)."""
from __future__ import annotations

import math

import torch

from .losses import discretized_gaussian_log_likelihood


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * noise: a sample of N(mu, sigma^2) that is differentiable in mu and sigma (Kingma & Welling 2014, eq. 10)."""
    return mu + torch.exp(0.5 * logvar) * noise


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per sample, in nats (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                            levels: int | None = None) -> torch.Tensor:
    """log p(x|z) per sample, summed over dimensions: a Gaussian density, or with `levels` the discretized Gaussian."""
    if levels is not None:
        return discretized_gaussian_log_likelihood(x, mean, torch.exp(2 * log_scale), levels).flatten(1).sum(1)
    per = -0.5 * ((x - mean) / log_scale.exp()) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)
    return per.flatten(1).sum(1)


def elbo(vae, x: torch.Tensor, beta: float = 1.0, levels: int | None = None, n_z: int = 1,
         generator: torch.Generator | None = None) -> dict:
    """E_q[log p(x|z)] - beta KL(q(z|x) || p(z)) per sample, in nats, with n_z samples of z (Kingma & Welling 2014, eq. 3).

    `vae` needs encode(x) -> (mu, logvar) and decode(z) -> (mean, log_scale). Returns the per-sample tensors
    'elbo', 'reconstruction' (the expected log-likelihood) and 'kl'. With beta = 1, elbo <= log p(x).
    """
    if not isinstance(n_z, int) or n_z < 1:
        raise ValueError(f"n_z must be a positive int, got {n_z!r}")
    mu, logvar = vae.encode(x)
    recon = 0.0
    for _ in range(n_z):
        noise = torch.randn(mu.shape, generator=generator).to(mu.device, mu.dtype)
        mean, log_scale = vae.decode(reparameterize(mu, logvar, noise))
        recon = recon + gaussian_log_likelihood(x, mean, log_scale, levels) / n_z
    kl = kl_to_standard_normal(mu, logvar)
    return {"elbo": recon - beta * kl, "reconstruction": recon, "kl": kl}


def __getattr__(name: str):
    """The networks lived here in earlier releases; they are in course_lib.nets.vae now (still importable from here)."""
    if name in ("VAE", "LOG_SCALE_RANGE"):
        from ._moved import moved_warning
        from .nets import vae as nets_vae

        moved_warning(f"course_lib.vae.{name}", f"course_lib.nets.vae.{name}")
        return getattr(nets_vae, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
