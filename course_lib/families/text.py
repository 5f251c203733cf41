"""Lesson 10's text families: masked (absorbing-state) diffusion trained on MDLM's objective (Sahoo et al. 2024,
eq. 10) with a bidirectional transformer, and the autoregressive baseline with the same transformer made causal."""
from __future__ import annotations

from dataclasses import dataclass

from ..captions import VOCAB_SIZE
from ..discrete import SCHEDULES
from ..text_models import autoregressive_loss, masked_diffusion_loss
from .base import Family


@dataclass
class MaskedDiffusionOptions:
    masking: str = "linear"             # the masking schedule alpha(t): linear (1 - t) | cosine

    def __post_init__(self):
        if self.masking not in SCHEDULES:
            raise ValueError(f"masking must be one of {SCHEDULES}, got {self.masking!r}")


@dataclass
class AutoregressiveOptions:
    """No fields of its own: the baseline is the loop's fields and the network."""


class _TextFamily(Family):
    """What both text families share: the caption data, one token transformer (causal or not), one loss per step."""

    causal: bool = False
    loss_names = ("loss",)

    def check(self, config) -> None:
        self.networks(config, (1,), None)

    def networks(self, config, shape, num_classes):
        if config.data != "captions":
            raise ValueError(f"a text family trains on data='captions', got {config.data!r}")
        if config.model.get("kind") != "token_transformer":
            raise ValueError(f"a text family needs model={{'kind': 'token_transformer', ...}}, got {config.model!r}")
        return {"model": {**config.model, "vocab_size": VOCAB_SIZE, "max_len": shape[0], "causal": self.causal}}

    def loss(self, trainer, x):
        raise NotImplementedError

    def step(self, trainer) -> list:
        x, _ = trainer.batch()
        loss = self.loss(trainer, x)
        trainer.update("model", loss)
        return [loss]


class MaskedDiffusionFamily(_TextFamily):
    """Draw captions and a time per caption; mask each token with probability 1 - alpha(t); the bidirectional network
    predicts the masked tokens, its cross-entropy weighted by -alpha'(t) / (1 - alpha(t))."""

    name, Options, causal = "masked_diffusion", MaskedDiffusionOptions, False

    def loss(self, trainer, x):
        return masked_diffusion_loss(trainer.model, x, trainer.config.options.masking, trainer.generator)


class AutoregressiveFamily(_TextFamily):
    """Draw captions; the causal network predicts each token from the ones before it (next-token cross-entropy)."""

    name, Options, causal = "autoregressive", AutoregressiveOptions, True

    def loss(self, trainer, x):
        return autoregressive_loss(trainer.model, x)
