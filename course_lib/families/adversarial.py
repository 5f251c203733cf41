"""Adversarial distillation in miniature (lesson 12): consistency distillation plus a GAN loss on the student's
one-step samples, as CTM (Kim et al. 2023) and ADD (Sauer et al. 2023, eq. 3) add a discriminator to distillation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..gan import discriminator_loss, generator_loss
from .fewstep import ConsistencyFamily, ConsistencyOptions


@dataclass
class AdversarialOptions(ConsistencyOptions):
    adv_weight: float = 0.1             # the student's loss: distillation + adv_weight x non-saturating GAN loss
    disc_base: int = 32                 # the discriminator: lesson 4's convolutional one, this many base channels

    def __post_init__(self):
        super().__post_init__()
        if self.teacher is None:
            raise ValueError("adversarial distillation needs a teacher (a shipped name such as 'digits_edm')")
        if isinstance(self.adv_weight, bool) or not isinstance(self.adv_weight, (int, float)) or self.adv_weight < 0:
            raise ValueError(f"adv_weight must be a number >= 0, got {self.adv_weight!r}")
        if isinstance(self.disc_base, bool) or not isinstance(self.disc_base, int) or self.disc_base < 1:
            raise ValueError(f"disc_base must be a positive int, got {self.disc_base!r}")


class AdversarialFamily(ConsistencyFamily):
    """Each step: the student's distillation loss plus adv_weight x -log D(f(sigma_max z, sigma_max)), then one
    discriminator update, real digits against those one-step samples."""

    name, Options, loss_names = "adversarial", AdversarialOptions, ("loss", "d_loss")

    def networks(self, config, shape, num_classes):
        if len(shape) != 3:
            raise ValueError(f"adversarial distillation here is for images, got data {config.data!r}")
        nets = super().networks(config, shape, num_classes)
        nets["disc"] = {"kind": "discriminator", "net": "conv", "dim": None, "in_channels": shape[0],
                        "base": config.options.disc_base, "spectral": False}
        return nets

    def step(self, trainer) -> list:
        o, disc = trainer.config.options, trainer.nets["disc"]
        x0, _ = trainer.batch()
        loss = self.consistency_loss(trainer, x0)
        top = torch.full((x0.shape[0],), o.sigma_max, device=x0.device)
        fake = trainer.model(o.sigma_max * torch.randn(x0.shape, generator=trainer.generator).to(x0.device), top)
        disc.requires_grad_(False)  # the student's step needs gradients through D, not for D
        trainer.update("model", loss + o.adv_weight * generator_loss(disc(fake)))
        self.update_target(trainer)
        disc.requires_grad_(True)
        d_loss = discriminator_loss(disc(x0), disc(fake.detach()))
        trainer.update("disc", d_loss)
        return [loss, d_loss]
