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


def _token_net(config, shape, causal: bool) -> dict:
    if config.data != "captions":
        raise ValueError(f"a text family trains on data='captions', got {config.data!r}")
    if config.model.get("kind") != "token_transformer":
        raise ValueError(f"a text family needs model={{'kind': 'token_transformer', ...}}, got {config.model!r}")
    return {"model": {**config.model, "vocab_size": VOCAB_SIZE, "max_len": shape[0], "causal": causal}}


class MaskedDiffusionFamily(Family):
    """Draw captions and a time per caption; mask each token with probability 1 - alpha(t); the bidirectional network
    predicts the masked tokens, its cross-entropy weighted by -alpha'(t) / (1 - alpha(t))."""

    name, Options, loss_names = "masked_diffusion", MaskedDiffusionOptions, ("loss",)

    def check(self, config) -> None:
        _token_net(config, (1,), False)

    def networks(self, config, shape, num_classes):
        return _token_net(config, shape, causal=False)

    def step(self, trainer) -> list:
        x, _ = trainer.batch()
        loss = masked_diffusion_loss(trainer.model, x, trainer.config.options.masking, trainer.generator)
        trainer.update("model", loss)
        return [loss]


class AutoregressiveFamily(Family):
    """Draw captions; the causal network predicts each token from the ones before it (next-token cross-entropy)."""

    name, Options, loss_names = "autoregressive", AutoregressiveOptions, ("loss",)

    def check(self, config) -> None:
        _token_net(config, (1,), True)

    def networks(self, config, shape, num_classes):
        return _token_net(config, shape, causal=True)

    def step(self, trainer) -> list:
        x, _ = trainer.batch()
        loss = autoregressive_loss(trainer.model, x)
        trainer.update("model", loss)
        return [loss]
