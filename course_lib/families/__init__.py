"""The families the training loop trains (course_lib.train.Trainer): each supplies its own config fields, its networks
and its training step, so adding a family (flow matching, a text model) adds a file here and a line in FAMILIES.

- diffusion.py: one denoiser trained on the simple loss (lesson 2);
- gan.py: a generator and a discriminator, `d_steps` discriminator updates per generator update (lesson 4);
- vae.py: an encoder and a decoder trained together on the ELBO (lesson 4);
- classifier.py: a noise-aware classifier p(y | x_t, t) for classifier guidance (lesson 6);
- edm.py: EDM's preconditioned denoiser, log-normal noise and loss weighting (lesson 11);
- flow.py: flow matching, and rectified flow's reflow from a teacher (lesson 9);
- fewstep.py: consistency distillation and training, progressive distillation (lesson 12);
- lcm.py: a latent consistency model of lesson 7's text-to-image model, guidance folded in (lesson 12);
- adversarial.py: consistency distillation with a discriminator on the one-step samples (lesson 12);
- text.py: masked diffusion on tokens and its autoregressive baseline (lesson 10);
- regression.py: a policy regressing action chunks on the observation, a diffusion policy's baseline (lesson 15).
"""
from __future__ import annotations

from .adversarial import AdversarialFamily, AdversarialOptions
from .base import Family
from .classifier import ClassifierFamily, ClassifierOptions
from .diffusion import DiffusionFamily, DiffusionOptions
from .edm import EDMFamily, EDMOptions
from .fewstep import ConsistencyFamily, ConsistencyOptions, ProgressiveFamily, ProgressiveOptions
from .flow import FlowFamily, FlowOptions
from .gan import GANFamily, GANOptions
from .lcm import LatentConsistencyFamily, LatentConsistencyOptions
from .regression import RegressionFamily, RegressionOptions
from .text import AutoregressiveFamily, AutoregressiveOptions, MaskedDiffusionFamily, MaskedDiffusionOptions
from .vae import VAEFamily, VAEOptions

FAMILIES: dict[str, Family] = {f.name: f for f in (DiffusionFamily(), GANFamily(), VAEFamily(), ClassifierFamily(),
                                               FlowFamily(), MaskedDiffusionFamily(), AutoregressiveFamily(),
                                               EDMFamily(), ConsistencyFamily(), ProgressiveFamily(), AdversarialFamily(),
                                               LatentConsistencyFamily(), RegressionFamily())}

__all__ = ["FAMILIES", "Family", "family", "AdversarialFamily", "AdversarialOptions", "AutoregressiveFamily", "AutoregressiveOptions", "ConsistencyFamily", "ConsistencyOptions",
           "ProgressiveFamily", "ProgressiveOptions", "MaskedDiffusionFamily",
           "MaskedDiffusionOptions", "ClassifierFamily", "ClassifierOptions", "DiffusionFamily", "DiffusionOptions", "EDMFamily", "EDMOptions", "FlowFamily", "FlowOptions", "GANFamily", "GANOptions", "LatentConsistencyFamily", "LatentConsistencyOptions", "RegressionFamily", "RegressionOptions",
           "VAEFamily", "VAEOptions"]


def family(name: str) -> Family:
    """The family called `name`, or a ValueError naming the ones there are."""
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {name!r}")
    return FAMILIES[name]
