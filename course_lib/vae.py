"""Variational autoencoders: a Gaussian encoder and decoder, the reparameterization trick and the ELBO."""
from __future__ import annotations

import math

import torch
from torch import nn

from .losses import discretized_gaussian_log_likelihood
from .models import ConvDecoder, ConvEncoder, ResMLP, check_data_shape

LOG_SCALE_RANGE = (-7.0, 2.0)  # decoder log-std is clamped here: no zero or runaway variances


class VAE(nn.Module):
    """q(z|x) = N(mu(x), diag sigma^2(x)) and p(x|z) = N(m(z), diag s^2(z)), prior N(0, I) (Kingma & Welling 2014)."""

    def __init__(self, net: str = "mlp", latent: int = 8, dim: int | None = 2, in_channels: int | None = None,
                 hidden: int = 256, depth: int = 3, base: int = 32):
        super().__init__()
        self.config = dict(kind="vae", net=net, latent=latent, dim=dim, in_channels=in_channels, hidden=hidden,
                           depth=depth, base=base)
        self.latent = latent
        if net == "mlp":
            self.encoder = ResMLP(dim, 2 * latent, hidden, depth)
            self.decoder = ResMLP(latent, 2 * dim, hidden, depth)
        elif net == "conv":
            self.encoder = ConvEncoder(in_channels, 2 * latent, base)
            self.decoder = ConvDecoder(latent, 2 * in_channels, base)
        else:
            raise ValueError(f"net must be 'mlp' or 'conv', got {net!r}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance, each (B, latent)."""
        check_data_shape(x, self.config)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The likelihood's mean and log-std, each shaped like a data batch."""
        if z.ndim != 2 or z.shape[1] != self.latent:
            raise ValueError(f"expected latents of shape (B, {self.latent}), got {tuple(z.shape)}")
        mean, log_scale = self.decoder(z).chunk(2, dim=1)
        return mean, log_scale.clamp(*LOG_SCALE_RANGE)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's mean: what 'a VAE sample' usually shows."""
        return self.decode(z)[0]

    def sample(self, n: int, generator: torch.Generator | None = None, noise: bool = False) -> torch.Tensor:
        """n samples from the prior through the decoder: its mean, or with noise=True a draw from p(x|z)."""
        z = torch.randn(n, self.latent, generator=generator).to(next(self.parameters()).device)
        mean, log_scale = self.decode(z)
        if not noise:
            return mean
        return mean + log_scale.exp() * torch.randn(mean.shape, generator=generator).to(mean.device)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Encode to the posterior mean and decode to the likelihood mean."""
        return self.decode(self.encode(x)[0])[0]


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
