"""The time-conditioned residual MLP that denoises 2D points (lessons 1-4) and action chunks (lesson 15)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import _batch_t, _check_prediction, _Labels, timestep_embedding


class TimeMLP(nn.Module):
    """Residual MLP on the concatenation of x and a sinusoidal embedding of t, for low-dimensional data.

    Conditioning, added to the first hidden layer: a class label y (num_classes), or a vector y of cond_dim numbers
    (cond_dim; lesson 15's observation: a linear map of it, as Chi et al. 2023 condition on the observation)."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, temb_dim: int = 64,
                 num_classes: int | None = None, prediction: str = "eps", cond_dim: int | None = None):
        super().__init__()
        _check_prediction(prediction)
        if cond_dim is not None and (isinstance(cond_dim, bool) or not isinstance(cond_dim, int) or cond_dim < 1):
            raise ValueError(f"cond_dim must be a positive int or None, got {cond_dim!r}")
        if cond_dim is not None and num_classes is not None:
            raise ValueError("give num_classes (a label) or cond_dim (a vector of numbers), not both")
        self.config = dict(kind="mlp", dim=dim, hidden=hidden, depth=depth, temb_dim=temb_dim,
                           num_classes=num_classes, prediction=prediction)
        if cond_dim is not None:  # only then: the configs of the models before lesson 15 stay as they were
            self.config["cond_dim"] = cond_dim
        self.prediction = prediction
        self.temb_dim = temb_dim
        self.labels = _Labels(num_classes, hidden)
        self.cond = nn.Linear(cond_dim, hidden) if cond_dim is not None else None
        self.inp = nn.Linear(dim + temb_dim, hidden)  # x and the time embedding, concatenated
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.config["dim"]:
            raise ValueError(f"expected points of shape (B, {self.config['dim']}), got {tuple(x.shape)}")
        temb = timestep_embedding(_batch_t(t, x), self.temb_dim).to(x.dtype)
        h = self.inp(torch.cat([x, temb], dim=1)) + (self._condition(y, x) if self.cond is not None
                                                     else self.labels(y, x.shape[0], x.device))
        for layer in self.layers:
            h = h + layer(F.silu(h))
        return self.out(F.silu(h))

    def _condition(self, y, x: torch.Tensor) -> torch.Tensor:
        want = (x.shape[0], self.config["cond_dim"])
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != want or not y.is_floating_point():
            raise ValueError(f"this model is conditioned on a vector: y must be a float tensor of shape {want}, got "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        return self.cond(y.to(x.dtype))
