"""VAEs as a family of the training loop: encoder and decoder trained together on the negative ELBO
(Kingma & Welling 2014, eq. 3; the ELBO: course_lib.vae.elbo)."""
from __future__ import annotations

from dataclasses import dataclass

from ..data import DIGITS_LEVELS
from ..vae import elbo
from .base import Family, plain_net


@dataclass
class VAEOptions:
    latent: int = 8                     # size of z
    beta: float = 1.0                   # weight of the KL term (beta-VAE; 1 is the true ELBO)

    def __post_init__(self):
        if not isinstance(self.latent, int) or self.latent < 1:
            raise ValueError(f"latent must be a positive int, got {self.latent!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")


class VAEFamily(Family):
    """One network (role "model": encoder and decoder); logs the negative ELBO per dimension and the KL term."""

    name, Options, loss_names = "vae", VAEOptions, ("loss", "kl")

    def networks(self, config, shape, num_classes):
        net, data_keys = plain_net(config, shape)
        return {"model": {"kind": "vae", **net, **data_keys, "latent": config.options.latent}}

    def step(self, trainer) -> list:
        x, _ = trainer.batch()
        levels = DIGITS_LEVELS if trainer.config.data == "digits" else None
        terms = elbo(trainer.model, x, beta=trainer.config.options.beta, levels=levels, generator=trainer.generator)
        values = [-terms["elbo"].mean() / x[0].numel(), terms["kl"].mean()]
        trainer.update("model", values[0])
        return values
