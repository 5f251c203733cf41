"""A noise-aware classifier as a family of the training loop: cross-entropy on data noised to a random step
(Dhariwal & Nichol 2021, sec. 4), so it can guide a diffusion model at every noise level (course_lib.guidance)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..forward import q_sample
from ..schedules import SCHEDULES, NoiseSchedule
from .base import Family


@dataclass
class ClassifierOptions:
    schedule: str = "cosine"            # the noise schedule of the diffusion model it will guide
    T: int = 1000

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if not isinstance(self.T, int) or self.T < 1:
            raise ValueError(f"T must be a positive int, got {self.T!r}")


class ClassifierFamily(Family):
    """One network (role "model"): draws x0 and its label, a step t and noise, and minimises -log p(y | x_t, t)."""

    name, Options, loss_names = "classifier", ClassifierOptions, ("loss", "accuracy")

    def check(self, config) -> None:
        if config.data != "digits":
            raise ValueError("a classifier needs labelled data (data='digits')")
        if config.model.get("kind", "noisy_classifier") != "noisy_classifier":
            raise ValueError(f"a classifier takes model={{'kind': 'noisy_classifier', 'base': ...}}, got {config.model!r}")

    def networks(self, config, shape, num_classes):
        return {"model": {**config.model, "kind": "noisy_classifier", "in_channels": shape[0],
                          "num_classes": num_classes}}

    def setup(self, trainer) -> None:
        trainer.schedule = NoiseSchedule.named(trainer.config.options.schedule, trainer.config.options.T)

    def step(self, trainer) -> list:
        x, y = trainer.batch()
        y = y.to(trainer.device)
        t = torch.randint(0, trainer.schedule.T, (len(x),), generator=trainer.generator).to(trainer.device)
        noise = torch.randn(x.shape, generator=trainer.generator).to(trainer.device)
        logits = trainer.model(q_sample(x, t, trainer.schedule, noise=noise), t)
        loss = F.cross_entropy(logits, y)
        trainer.update("model", loss)
        return [loss, (logits.argmax(1) == y).float().mean()]
