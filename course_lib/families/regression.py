"""Regression as a family of the training loop: the baseline a diffusion policy is compared with (Chi et al. 2023,
sec. 4: a policy trained on the mean squared error of its actions). The same denoiser network, called at t = 0 on
zeros, maps the observation straight to an action chunk; it can only learn the mean of the chunks it saw there."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Family


@dataclass
class RegressionOptions:
    """No options of its own: the network, data and budget are the loop's, as the diffusion policy's."""


class RegressionFamily(Family):
    """One network (role "model"): predicts x from its condition y by mean squared error, with x and t fixed to 0."""

    name, Options, loss_names = "regression", RegressionOptions, ("loss",)

    def check(self, config) -> None:
        from ..data import COND_DIMS

        if config.data not in COND_DIMS:
            raise ValueError(f"regression predicts a sample from its observation: it needs data with one "
                             f"({', '.join(COND_DIMS)}), got data={config.data!r}")
        if config.model.get("kind", "mlp") != "mlp":
            raise ValueError(f"regression takes model={{'kind': 'mlp', ...}}, got {config.model!r}")

    def networks(self, config, shape, num_classes):
        from ..data import COND_DIMS

        return {"model": {**config.model, "dim": shape[0], "prediction": "x0", "cond_dim": COND_DIMS[config.data]}}

    def step(self, trainer) -> list:
        x, y = trainer.batch()
        loss = torch.nn.functional.mse_loss(regress(trainer.model, y.to(trainer.device)), x)
        trainer.update("model", loss)
        return [loss]


def regress(model, y: torch.Tensor) -> torch.Tensor:
    """The regression network's prediction for conditions y (B, cond_dim): its output at x = 0, t = 0."""
    dim = model.config["dim"]
    return model(torch.zeros(len(y), dim, device=y.device, dtype=y.dtype), torch.zeros(len(y), device=y.device), y=y)
