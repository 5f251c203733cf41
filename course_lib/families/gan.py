"""GANs as a family of the training loop: `d_steps` discriminator updates, then one non-saturating generator update
(Goodfellow et al. 2014, alg. 1), with optional spectral norm or R1 (the losses: course_lib.gan)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..gan import GAN_REGS, discriminator_loss, generator_loss, r1_penalty
from .base import Family, plain_net


@dataclass
class GANOptions:
    latent: int = 8                     # size of z
    gan_reg: str = "none"               # regulariser: none | spectral (spectral norm in D) | r1 (gradient penalty)
    r1_gamma: float = 1.0               # R1 weight: the D loss gets + gamma/2 * E||grad D(x_real)||^2
    d_steps: int = 1                    # discriminator updates per generator update

    def __post_init__(self):
        if self.gan_reg not in GAN_REGS:
            raise ValueError(f"gan_reg must be one of {GAN_REGS}, got {self.gan_reg!r}")
        if self.r1_gamma < 0:
            raise ValueError(f"r1_gamma must be >= 0, got {self.r1_gamma!r}")
        for name in ("latent", "d_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")


class GANFamily(Family):
    """A generator (role "model", the one that samples) and a discriminator (role "disc", its own optimizer)."""

    name, Options, loss_names = "gan", GANOptions, ("d_loss", "g_loss")

    def networks(self, config, shape, num_classes):
        net, data_keys = plain_net(config, shape)
        o = config.options
        return {"model": {"kind": "generator", **net, **data_keys, "latent": o.latent},
                "disc": {"kind": "discriminator", **net, **data_keys, "spectral": o.gan_reg == "spectral"}}

    def step(self, trainer) -> list:
        o, disc = trainer.config.options, trainer.nets["disc"]
        disc.requires_grad_(True)
        for _ in range(o.d_steps):
            x, _ = trainer.batch()
            with torch.no_grad():
                fake = trainer.model.sample(len(x), trainer.generator)
            d_loss = discriminator_loss(disc(x), disc(fake))
            penalty = o.r1_gamma / 2 * r1_penalty(disc, x) if o.gan_reg == "r1" else 0.0
            trainer.update("disc", d_loss + penalty)
        disc.requires_grad_(False)  # the generator's step needs gradients through D, not for D
        g_loss = generator_loss(disc(trainer.model.sample(trainer.config.batch_size, trainer.generator)))
        trainer.update("model", g_loss)
        return [d_loss, g_loss]
