"""A small KL-regularised convolutional autoencoder: images to a few-channel latent grid and back (Rombach et al.
2022, sec. 3 and app. G: the 'KL-f4' first stage of latent diffusion, without the adversarial loss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import _groups


class _Res(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual connection (a UNet ResBlock without the time embedding)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(_groups(cin, groups), cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                 nn.GroupNorm(_groups(cout, groups), cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.net(x)


class KLAutoencoder(nn.Module):
    """x (B, C, H, W) -> a diagonal Gaussian q(z | x) over (B, z_channels, H/f, W/f) -> a reconstruction, f = 2**(len(mults)-1).

    encode(x) gives (mean, logvar); decode(z) the image; forward(x) samples z = mean + std * eps when `sample`, else
    uses the mean, and returns (reconstruction, mean, logvar).
    """

    def __init__(self, in_channels: int = 3, base: int = 32, mults=(1, 2, 2), z_channels: int = 4, num_res: int = 1,
                 groups: int = 8):
        super().__init__()
        mults = [int(m) for m in mults]
        if not mults or base < 1 or z_channels < 1 or num_res < 1:
            raise ValueError("need at least one level, base >= 1, z_channels >= 1 and num_res >= 1")
        self.config = dict(kind="kl_autoencoder", in_channels=in_channels, base=base, mults=mults,
                           z_channels=z_channels, num_res=num_res, groups=groups)
        self.factor = 2 ** (len(mults) - 1)
        enc, ch = [nn.Conv2d(in_channels, base * mults[0], 3, padding=1)], base * mults[0]
        for level, m in enumerate(mults):
            for _ in range(num_res):
                enc.append(_Res(ch, base * m, groups))
                ch = base * m
            if level != len(mults) - 1:
                enc.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        enc += [_Res(ch, ch, groups), nn.GroupNorm(_groups(ch, groups), ch), nn.SiLU(), nn.Conv2d(ch, 2 * z_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(z_channels, ch, 3, padding=1), _Res(ch, ch, groups)]
        for level, m in reversed(list(enumerate(mults))):
            for _ in range(num_res):
                dec.append(_Res(ch, base * m, groups))
                ch = base * m
            if level != 0:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        dec += [nn.GroupNorm(_groups(ch, groups), ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def _check(self, x: torch.Tensor, channels: int, what: str, f: int = 1) -> None:
        if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"expected {what} of shape (B, {channels}, H, W)"
                             + (f" with H and W divisible by {f}" if f > 1 else "") + f", got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and log-variance of q(z | x), each (B, z_channels, H/f, W/f); logvar clamped to [-30, 20] as in LDM."""
        self._check(x, self.config["in_channels"], "images", self.factor)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check(z, self.config["z_channels"], "latents")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        mean, logvar = self.encode(x)
        z = mean
        if sample:
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator).to(mean)
        return self.decode(z), mean, logvar


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per element, averaged (Kingma & Welling 2014, app. B)."""
    return 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).mean()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1] (peak-to-peak range 2)."""
    mse = F.mse_loss(x.clamp(-1, 1), y.clamp(-1, 1), reduction="none").flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))
