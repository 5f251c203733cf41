"""EDM as a family of the training loop (Karras et al. 2022, sec. 5): a preconditioned denoiser (nets.EDMPrecond)
trained on lambda(sigma) ||D(x0 + sigma n) - x0||^2 with sigma drawn log-normally (or uniformly in a schedule's
timesteps, as lesson 2 did): each choice an option, so the lesson can change one at a time."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..edm import (
    LOSS_WEIGHTINGS,
    NOISE_DISTRIBUTIONS,
    P_MEAN,
    P_STD,
    PRECONDITIONINGS,
    SIGMA_DATA,
    draw_sigmas,
    edm_loss,
)
from ..schedules import ALL_SCHEDULES, NoiseSchedule
from .base import Family


@dataclass
class EDMOptions:
    precond: str = "edm"                # edm (unit variance in and out) | vp (an eps network on `schedule`)
    sigma_data: float = SIGMA_DATA      # the data's std the preconditioning assumes
    noise: str = "lognormal"            # training sigmas: lognormal (p_mean, p_std) | uniform_t (uniform timesteps)
    p_mean: float = P_MEAN
    p_std: float = P_STD
    schedule: str = "cosine"            # the discrete schedule of noise='uniform_t' and precond='vp'
    T: int = 1000
    loss_weight: str = "edm"            # lambda(sigma): edm | eps | min_snr | uniform (course_lib.edm.loss_weight)
    gamma: float = 5.0                  # min_snr's clip
    learned_weight: bool = False        # EDM2's learned uncertainty u(sigma) on top of lambda (Karras et al. 2024)
    sigma_shift: float = 1.0            # every training sigma times this (a larger image needs more noise: lesson 11)

    def __post_init__(self):
        choices = {"precond": PRECONDITIONINGS, "noise": NOISE_DISTRIBUTIONS, "loss_weight": LOSS_WEIGHTINGS,
                   "schedule": tuple(ALL_SCHEDULES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("sigma_data", "p_std", "gamma", "sigma_shift"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"{name} must be a number > 0, got {v!r}")
        if isinstance(self.p_mean, bool) or not isinstance(self.p_mean, (int, float)) or not math.isfinite(self.p_mean):
            raise ValueError(f"p_mean must be a finite number, got {self.p_mean!r}")
        if not isinstance(self.T, int) or self.T < 1:
            raise ValueError(f"T must be a positive int, got {self.T!r}")


class EDMFamily(Family):
    """Draw x0, sigma and noise; regress the preconditioned denoiser on x0 with weight lambda(sigma) (edm.edm_loss)."""

    name, Options, loss_names = "edm", EDMOptions, ("loss",)

    def networks(self, config, shape, num_classes):
        o = config.options
        data_keys = {"dim": shape[0]} if len(shape) == 1 else {"in_channels": shape[0]}
        return {"model": {"kind": "edm_precond", "net": {**config.model, **data_keys}, "sigma_data": o.sigma_data,
                          "precond": o.precond, "schedule": o.schedule, "T": o.T, "uncertainty": o.learned_weight}}

    def setup(self, trainer) -> None:
        o = trainer.config.options
        trainer.schedule = None  # sampling needs none: the network is a denoiser of sigma
        trainer.noise_schedule = NoiseSchedule.named(o.schedule, o.T) if o.noise == "uniform_t" else None

    def step(self, trainer) -> list:
        o = trainer.config.options
        x, _ = trainer.batch()
        sigma = draw_sigmas(len(x), o.noise, trainer.generator, o.p_mean, o.p_std, trainer.noise_schedule)
        loss = edm_loss(trainer.model, x, sigma.to(trainer.device) * o.sigma_shift, o.loss_weight,
                        generator=trainer.generator, gamma=o.gamma, learned=o.learned_weight)
        trainer.update("model", loss)
        return [loss]
