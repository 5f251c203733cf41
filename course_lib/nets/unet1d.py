"""A small UNet over one dimension, for sound (lesson 15): the image UNet's residual blocks with Conv1d (Ho et al. 2020,
app. B; WaveGrad and DiffWave denoise waveforms with 1D convolutions the same way)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import _batch_t, _check_prediction, timestep_embedding
from .unet import _groups


class ResBlock1d(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, a 1x1 skip when channels change."""

    def __init__(self, cin: int, cout: int, emb_dim: int, kernel: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin, 8), cin), nn.Conv1d(cin, cout, kernel, padding=kernel // 2)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout, 8), cout), nn.Conv1d(cout, cout, kernel, padding=kernel // 2)
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet1D(nn.Module):
    """Signals (B, C, L) -> a prediction of the same shape; L divisible by 2^(len(mults) - 1). One residual block per
    level down and two up, strided convolutions down, nearest-neighbour upsampling up."""

    def __init__(self, in_channels: int = 1, base: int = 16, mults=(1, 2, 4), kernel: int = 5, temb_dim: int = 64,
                 prediction: str = "eps", num_classes: int | None = None):
        super().__init__()
        _check_prediction(prediction)
        if num_classes is not None:
            raise ValueError("UNet1D is unconditional: num_classes must be None")
        mults = [int(m) for m in mults]
        if not mults or any(m < 1 for m in mults) or kernel % 2 == 0:
            raise ValueError(f"need mults of positive ints and an odd kernel, got {mults!r} and {kernel!r}")
        self.config = dict(kind="unet1d", in_channels=in_channels, base=base, mults=mults, kernel=kernel,
                           temb_dim=temb_dim, prediction=prediction, num_classes=None)
        self.prediction, self.temb_dim = prediction, temb_dim
        self.time = nn.Sequential(nn.Linear(temb_dim, 4 * base), nn.SiLU(), nn.Linear(4 * base, 4 * base))
        chans = [base * m for m in mults]
        self.stem = nn.Conv1d(in_channels, chans[0], kernel, padding=kernel // 2)
        self.down = nn.ModuleList(ResBlock1d(c_in, c, 4 * base, kernel) for c_in, c in zip([chans[0]] + chans[:-1], chans))
        self.pool = nn.ModuleList(nn.Conv1d(c, c, 4, stride=2, padding=1) for c in chans[:-1])
        self.mid = ResBlock1d(chans[-1], chans[-1], 4 * base, kernel)
        self.up = nn.ModuleList(ResBlock1d(2 * c, c_out, 4 * base, kernel)
                                for c, c_out in zip(chans[::-1], chans[::-1][1:] + [chans[0]]))
        self.out = nn.Sequential(nn.GroupNorm(_groups(chans[0], 8), chans[0]), nn.SiLU(),
                                 nn.Conv1d(chans[0], in_channels, kernel, padding=kernel // 2))

    def forward(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
        levels = len(self.config["mults"])
        if x.ndim != 3 or x.shape[1] != self.config["in_channels"] or x.shape[2] % 2 ** (levels - 1):
            raise ValueError(f"expected signals (B, {self.config['in_channels']}, L) with L divisible by "
                             f"{2 ** (levels - 1)}, got {tuple(x.shape)}")
        if y is not None:
            raise ValueError("this model is unconditional but was given y")
        emb = self.time(timestep_embedding(_batch_t(t, x), self.temb_dim).to(x.dtype))
        h, skips = self.stem(x), []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.pool):
                h = self.pool[i](h)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.up) - 1:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.out(h)
