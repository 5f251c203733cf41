"""The VAE's network (lesson 4): a Gaussian encoder q(z|x) and a Gaussian decoder p(x|z), MLP or 8x8 conv."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvDecoder, ConvEncoder, ResMLP, check_data_shape

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
