"""The GAN objective (lesson 4): the non-saturating losses and the R1 penalty (networks: course_lib.nets.gan)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GAN_REGS = ("none", "spectral", "r1")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))), batch mean: the discriminator's side of Goodfellow et al. (2014), eq. 1."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss -log D(G(z)) (Goodfellow et al. 2014, sec. 3)."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(disc: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """R1 = E ||grad_x D(x)||^2 on real data (Mescheder et al. 2018, eq. 9); add gamma/2 times it to the D loss."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(real).sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def __getattr__(name: str):
    """The networks lived here in earlier releases; they are in course_lib.nets.gan now (still importable from here)."""
    if name in ("Generator", "Discriminator"):
        from ._moved import moved_warning
        from .nets import gan as nets_gan

        moved_warning(f"course_lib.gan.{name}", f"course_lib.nets.gan.{name}")
        return getattr(nets_gan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
