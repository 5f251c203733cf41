"""Denoising networks: a time-conditioned MLP for 2D points and a small UNet for images.

Both are plain callables `model(x, t, y=None)`: x a batch, t integer (or fractional) timesteps of shape (B,)
or a scalar, y optional class labels. Each carries `.config` (enough to rebuild it) and `.prediction`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import group_norm_silu
from .losses import PREDICTIONS


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps, shape (B, dim) (Vaswani et al. 2017, sec. 3.5; Ho et al. 2020, app. B)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
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


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS[:3]:
        raise ValueError(f"a network predicts one of {PREDICTIONS[:3]}, got {prediction!r}")


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


def _groups(channels: int, groups: int) -> int:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added in between, 1x1 skip when channels change (Ho et al. 2020)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin, groups), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout, groups), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(group_norm_silu(x, self.norm1)) + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(group_norm_silu(h, self.norm2)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb=None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """A small DDPM-style UNet: residual blocks, GroupNorm, sinusoidal time embedding, attention at the lowest resolution.

    `mults` gives the channel multiplier per resolution; the image side must be divisible by 2**(len(mults)-1)
    (mults=(1, 2, 2) works at 8x8, 28x28 and 32x32).
    """

    def __init__(self, in_channels: int = 1, base: int = 64, mults=(1, 2, 2), num_res: int = 2, heads: int = 4,
                 groups: int = 8, dropout: float = 0.0, num_classes: int | None = None, prediction: str = "eps"):
        super().__init__()
        _check_prediction(prediction)
        mults = tuple(int(m) for m in mults)
        if not mults or num_res < 1 or base < 1:
            raise ValueError("need at least one resolution level, num_res >= 1 and base >= 1")
        self.config = dict(kind="unet", in_channels=in_channels, base=base, mults=list(mults), num_res=num_res,
                           heads=heads, groups=groups, dropout=dropout, num_classes=num_classes,
                           prediction=prediction)
        self.prediction = prediction
        emb_dim = 4 * base
        self.base = base
        self.time = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.labels = _Labels(num_classes, emb_dim)
        self.stem = nn.Conv2d(in_channels, base, 3, padding=1)
        last = len(mults) - 1

        def block(cin, cout, level):
            layers = [ResBlock(cin, cout, emb_dim, groups, dropout)]
            if level == last:
                layers.append(SelfAttention(cout, heads, groups))
            return nn.ModuleList(layers)

        self.down, skips, ch = nn.ModuleList(), [base], base
        for level, m in enumerate(mults):
            for _ in range(num_res):
                self.down.append(block(ch, base * m, level))
                ch = base * m
                skips.append(ch)
            if level != last:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, groups, dropout), SelfAttention(ch, heads, groups),
                                  ResBlock(ch, ch, emb_dim, groups, dropout)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mults))):
            for _ in range(num_res + 1):
                self.up.append(block(ch + skips.pop(), base * m, level))
                ch = base * m
            if level != 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch, groups), ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
        c, factor = self.config["in_channels"], 2 ** (len(self.config["mults"]) - 1)
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"expected images of shape (B, {c}, H, W) with H and W divisible by {factor}, "
                             f"got {tuple(x.shape)}")
        emb = self.time(timestep_embedding(_batch_t(t, x), self.base)) + self.labels(y, x.shape[0], x.device)
        emb = F.silu(emb)
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                for sub in layer:
                    h = sub(h, emb)
            else:
                h = layer(h)
            hs.append(h)
        for sub in self.mid:
            h = sub(h, emb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)
                for sub in layer:
                    h = sub(h, emb)
            else:
                h = layer(h)
        return self.out(h)


# ---- plain networks for the other families (lesson 4: GAN and VAE) ----------------------------------------------


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


MODELS = {"mlp": TimeMLP, "unet": UNet}


def _all_models() -> dict:
    from .gan import Discriminator, Generator
    from .vae import VAE

    return {**MODELS, "generator": Generator, "discriminator": Discriminator, "vae": VAE}


def build_model(config: dict) -> nn.Module:
    """Rebuild a model from its `.config` dict (the 'kind' key picks the class)."""
    models = _all_models()
    if not isinstance(config, dict) or config.get("kind") not in models:
        raise ValueError(f"model config needs 'kind' in {sorted(models)}, got {config!r}")
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    try:
        return models[config["kind"]](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad model config {config!r}: {e}") from None


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(model: nn.Module) -> str:
    """One line: the model's kind, its parameter count and its prediction type."""
    kind = model.config["kind"] if hasattr(model, "config") else type(model).__name__
    return f"{type(model).__name__} ({kind}): {count_parameters(model):,} parameters, predicts {getattr(model, 'prediction', '?')}"
