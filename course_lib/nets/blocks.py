"""Building blocks shared by the networks: the sinusoidal time embedding, class labels, residual MLPs, 8x8 conv stacks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import PREDICTIONS


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps, shape (B, dim) (Vaswani et al. 2017, sec. 3.5; Ho et al. 2020, app. B):
    [cos, sin] of t * max_period^(-k / (dim/2 - freq_shift)), k = 0 .. dim/2 - 1."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _batch_t(t, x: torch.Tensor) -> torch.Tensor:
    """Timesteps as a (B,) tensor on x's device: a scalar is repeated for the whole batch."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


NET_PREDICTIONS = (*PREDICTIONS[:3], "flow")  # eps / x0 / v on a noise schedule, or a flow-matching velocity


def _check_prediction(prediction: str) -> None:
    if prediction not in NET_PREDICTIONS:
        raise ValueError(f"a network predicts one of {NET_PREDICTIONS}, got {prediction!r}")


class _Labels(nn.Module):
    """Class-label embedding with one extra 'no label' index (used for unconditional calls and label dropout)."""

    def __init__(self, num_classes: int | None, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, dim) if num_classes else None

    def forward(self, y, batch: int, device) -> torch.Tensor | int:
        if self.embed is None:
            if y is not None:
                raise ValueError("this model is unconditional (num_classes=None) but was given labels y")
            return 0
        if y is None:
            y = torch.full((batch,), self.num_classes, device=device)
        y = torch.as_tensor(y, device=device).long()
        if y.shape != (batch,) or (y < 0).any() or (y > self.num_classes).any():
            raise ValueError(f"y must hold {batch} labels in [0, {self.num_classes}] "
                             f"({self.num_classes} = no label), got shape {tuple(y.shape)}")
        return self.embed(y)



def _activation(act: str) -> nn.Module:
    if act not in ("silu", "lrelu"):
        raise ValueError(f"act must be 'silu' or 'lrelu', got {act!r}")
    return nn.SiLU() if act == "silu" else nn.LeakyReLU(0.2)


def _sn(layer: nn.Module, spectral: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(layer) if spectral else layer


class ResMLP(nn.Module):
    """din -> dout: a linear stem, `depth` residual activation-linear layers, a linear head (TimeMLP without time)."""

    def __init__(self, din: int, dout: int, hidden: int = 256, depth: int = 3, spectral: bool = False,
                 act: str = "silu"):
        super().__init__()
        self.act = _activation(act)
        self.inp = _sn(nn.Linear(din, hidden), spectral)
        self.layers = nn.ModuleList(_sn(nn.Linear(hidden, hidden), spectral) for _ in range(depth))
        self.out = _sn(nn.Linear(hidden, dout), spectral)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(self.act(h))
        return self.out(self.act(h))


class ConvEncoder(nn.Module):
    """An 8x8 image -> a vector: conv at 8x8, strided convs to 4x4 and 2x2, then a linear layer (DCGAN-style)."""

    def __init__(self, in_channels: int, out_dim: int, base: int = 32, spectral: bool = False, act: str = "silu"):
        super().__init__()
        a = _activation(act)
        self.net = nn.Sequential(
            _sn(nn.Conv2d(in_channels, base, 3, padding=1), spectral), a,
            _sn(nn.Conv2d(base, 2 * base, 4, stride=2, padding=1), spectral), a,      # 4x4
            _sn(nn.Conv2d(2 * base, 4 * base, 4, stride=2, padding=1), spectral), a,  # 2x2
            nn.Flatten(), _sn(nn.Linear(16 * base, out_dim), spectral))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """A vector -> an 8x8 image: a linear layer to 2x2 maps, upsample + conv to 4x4 and 8x8, a conv to the output."""

    def __init__(self, in_dim: int, out_channels: int, base: int = 32, act: str = "silu"):
        super().__init__()
        a = _activation(act)
        self.base = base
        self.inp = nn.Sequential(nn.Linear(in_dim, 16 * base), a)
        self.net = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(4 * base, 2 * base, 3, padding=1), a,  # 4x4
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * base, base, 3, padding=1), a,      # 8x8
            nn.Conv2d(base, out_channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.inp(z).view(-1, 4 * self.base, 2, 2))


def check_data_shape(x: torch.Tensor, config: dict) -> None:
    """Points (B, dim) for an MLP config, 8x8 images (B, C, 8, 8) for a conv config; a clear error otherwise."""
    if config["net"] == "mlp" and (x.ndim != 2 or x.shape[1] != config["dim"]):
        raise ValueError(f"expected points of shape (B, {config['dim']}), got {tuple(x.shape)}")
    if config["net"] == "conv" and (x.ndim != 4 or tuple(x.shape[1:]) != (config["in_channels"], 8, 8)):
        raise ValueError(f"expected images of shape (B, {config['in_channels']}, 8, 8), got {tuple(x.shape)}")
