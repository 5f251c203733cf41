"""The GAN's networks (lesson 4): a generator z -> sample and a discriminator sample -> logit, MLP or 8x8 conv."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvDecoder, ConvEncoder, ResMLP, check_data_shape


class Generator(nn.Module):
    """z ~ N(0, I) -> a sample: a residual MLP for points, a conv decoder with tanh for 8x8 images (Goodfellow et al. 2014)."""

    def __init__(self, net: str = "mlp", latent: int = 8, dim: int | None = 2, in_channels: int | None = None,
                 hidden: int = 256, depth: int = 3, base: int = 32):
        super().__init__()
        self.config = dict(kind="generator", net=net, latent=latent, dim=dim, in_channels=in_channels,
                           hidden=hidden, depth=depth, base=base)
        self.latent = latent
        if net == "mlp":
            self.body = ResMLP(latent, dim, hidden, depth)
        elif net == "conv":
            self.body = nn.Sequential(ConvDecoder(latent, in_channels, base), nn.Tanh())
        else:
            raise ValueError(f"net must be 'mlp' or 'conv', got {net!r}")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent:
            raise ValueError(f"expected latents of shape (B, {self.latent}), got {tuple(z.shape)}")
        return self.body(z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples from fresh latents (drawn on the CPU with `generator`, so runs are reproducible)."""
        z = torch.randn(n, self.latent, generator=generator).to(next(self.parameters()).device)
        return self(z)


class Discriminator(nn.Module):
    """A sample -> one logit (real > 0 > fake); optional spectral norm on every layer (Miyato et al. 2018)."""

    def __init__(self, net: str = "mlp", dim: int | None = 2, in_channels: int | None = None, hidden: int = 256,
                 depth: int = 3, base: int = 32, spectral: bool = False):
        super().__init__()
        self.config = dict(kind="discriminator", net=net, dim=dim, in_channels=in_channels, hidden=hidden,
                           depth=depth, base=base, spectral=spectral)
        if net == "mlp":
            self.body = ResMLP(dim, 1, hidden, depth, spectral=spectral, act="lrelu")
        elif net == "conv":
            self.body = ConvEncoder(in_channels, 1, base, spectral=spectral, act="lrelu")
        else:
            raise ValueError(f"net must be 'mlp' or 'conv', got {net!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_data_shape(x, self.config)
        return self.body(x).squeeze(1)
