"""Diffusion as a family of the training loop: one denoiser, the simple loss on a noise schedule (Ho et al. 2020, eq. 14)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import PREDICTIONS, WEIGHTINGS, diffusion_loss
from ..schedules import ALL_SCHEDULES, NoiseSchedule
from .base import Family


@dataclass
class DiffusionOptions:
    schedule: str = "linear"            # noise schedule name (course_lib.schedules)
    T: int = 1000                       # number of diffusion steps
    prediction: str = "eps"             # what the network outputs: eps | x0 | v
    weighting: str = "uniform"          # loss weighting: uniform | min_snr
    gamma: float = 5.0                  # min-SNR-gamma clip
    conditional: bool = False           # feed class labels (digits; a mixture's mode), or the observation (reaching)
    label_dropout: float = 0.1          # share of labels replaced by 'no label' (for classifier-free guidance)

    def __post_init__(self):
        if self.schedule not in ALL_SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(ALL_SCHEDULES)}, got {self.schedule!r}")
        if self.prediction not in PREDICTIONS[:3]:
            raise ValueError(f"prediction must be one of {PREDICTIONS[:3]}, got {self.prediction!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not isinstance(self.T, int) or self.T < 1:
            raise ValueError(f"T must be a positive int, got {self.T!r}")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma!r}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"need 0 <= label_dropout < 1, got {self.label_dropout!r}")


class DiffusionFamily(Family):
    """Draw x0, a step t and noise; regress the network's prediction on its target (losses.diffusion_loss)."""

    name, Options, loss_names = "diffusion", DiffusionOptions, ("loss",)

    def check(self, config) -> None:
        from ..data import COND_DIMS, MIXTURES

        o = config.options
        if o.conditional and config.data not in ("digits", *MIXTURES, *COND_DIMS):
            raise ValueError(f"conditional=True needs labelled data (digits, or a mixture whose label is the mode: "
                             f"{', '.join(MIXTURES)}) or an observation ({', '.join(COND_DIMS)}), got "
                             f"data={config.data!r}")
        if config.data in COND_DIMS and not o.conditional:
            raise ValueError(f"data={config.data!r} pairs each sample with its observation: train with "
                             "conditional=True (a policy that never sees where it is cannot act)")
        if config.data in COND_DIMS and o.label_dropout != 0:
            raise ValueError(f"label_dropout drops class labels; {config.data!r} is conditioned on an observation, "
                             "which is never dropped: set label_dropout=0")

    def networks(self, config, shape, num_classes):
        from ..data import COND_DIMS

        o = config.options
        data_keys = {"dim": shape[0]} if len(shape) == 1 else {"in_channels": shape[0]}
        if config.data in COND_DIMS:  # a vector condition (lesson 15's observation), not a label
            return {"model": {**config.model, **data_keys, "prediction": o.prediction,
                              "cond_dim": COND_DIMS[config.data]}}
        return {"model": {**config.model, **data_keys, "prediction": o.prediction,
                          "num_classes": num_classes if o.conditional else None}}

    def setup(self, trainer) -> None:
        trainer.schedule = NoiseSchedule.named(trainer.config.options.schedule, trainer.config.options.T)

    def step(self, trainer) -> list:
        o = trainer.config.options
        x, y = trainer.batch()
        kwargs = {}
        if trainer.source.cond_dim is not None:  # the observation, always given
            kwargs["y"] = y.to(trainer.device)
        elif o.conditional:  # label dropout: the same network learns the unconditional model ('no label' index)
            drop = torch.rand(len(y), generator=trainer.generator) < o.label_dropout
            kwargs["y"] = torch.where(drop, torch.full_like(y, trainer.source.num_classes), y).to(trainer.device)
        loss = diffusion_loss(trainer.model, x, trainer.schedule, o.prediction, o.weighting, o.gamma,
                              generator=trainer.generator, rows=trainer.rows, **kwargs)
        trainer.update("model", loss)
        return [loss]
