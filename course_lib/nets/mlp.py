"""The time-conditioned residual MLP that denoises 2D points (lessons 1-4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import _batch_t, _check_prediction, _Labels, timestep_embedding


class TimeMLP(nn.Module):
    """Residual MLP on the concatenation of x and a sinusoidal embedding of t, for low-dimensional data."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, temb_dim: int = 64,
                 num_classes: int | None = None, prediction: str = "eps"):
        super().__init__()
        _check_prediction(prediction)
        self.config = dict(kind="mlp", dim=dim, hidden=hidden, depth=depth, temb_dim=temb_dim,
                           num_classes=num_classes, prediction=prediction)
        self.prediction = prediction
        self.temb_dim = temb_dim
        self.labels = _Labels(num_classes, hidden)
        self.inp = nn.Linear(dim + temb_dim, hidden)  # x and the time embedding, concatenated
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.config["dim"]:
            raise ValueError(f"expected points of shape (B, {self.config['dim']}), got {tuple(x.shape)}")
        temb = timestep_embedding(_batch_t(t, x), self.temb_dim).to(x.dtype)
        h = self.inp(torch.cat([x, temb], dim=1)) + self.labels(y, x.shape[0], x.device)
        for layer in self.layers:
            h = h + layer(F.silu(h))
        return self.out(F.silu(h))
