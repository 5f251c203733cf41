"""A network made a denoiser by preconditioning: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (Karras et al.
2022, eq. 7 and Table 1), with EDM2's optional learned uncertainty u(sigma) (Karras et al. 2024, eq. 21)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..schedules import NoiseSchedule
from .blocks import timestep_embedding

SIGMA_DATA = 0.5
TIME_SCALE, TIME_SHIFT = 400.0, 500.0  # c_noise into a network built for timesteps 0 .. 999 (course_lib.edm)


class EDMPrecond(nn.Module):
    """Wraps any denoising network F (mlp, unet, dit config) as D(x, sigma); `.prediction` is 'edm': call it with
    noise levels sigma (B,) or a scalar, not timesteps. precond='edm' (unit variance in and out, sigma_data) or 'vp'
    (an eps network on the discrete `schedule`, c_noise its fractional timestep)."""

    def __init__(self, net: dict, sigma_data: float = SIGMA_DATA, precond: str = "edm", schedule: str = "cosine",
                 T: int = 1000, uncertainty: bool = False):
        super().__init__()
        from . import DENOISERS, build_model

        if not isinstance(net, dict) or net.get("kind") not in DENOISERS:
            raise ValueError(f"net must be a denoising network's config with kind in {DENOISERS}, got {net!r}")
        if precond not in ("edm", "vp"):
            raise ValueError(f"precond must be 'edm' or 'vp', got {precond!r}")
        if not (isinstance(sigma_data, (int, float)) and 0 < sigma_data < math.inf):
            raise ValueError(f"sigma_data must be a number > 0, got {sigma_data!r}")
        inner = {**net, "prediction": "eps"}
        self.config = dict(kind="edm_precond", net=inner, sigma_data=float(sigma_data), precond=precond,
                           schedule=schedule, T=T, uncertainty=bool(uncertainty))
        self.prediction, self.sigma_data, self.precond = "edm", float(sigma_data), precond
        self.net = build_model(inner)
        self.num_classes = getattr(self.net, "num_classes", None)
        if precond == "vp":
            sched = NoiseSchedule.named(schedule, T)
            self.register_buffer("log_sigmas", sched.sigmas.log().float(), persistent=False)
            self.sigma_min, self.sigma_max = (float(v) for v in sched.sigmas[[0, -1]])
        else:
            self.sigma_min, self.sigma_max = 0.002, 80.0
        self.logvar = nn.Linear(32, 1) if uncertainty else None
        if self.logvar is not None:
            nn.init.zeros_(self.logvar.weight)
            nn.init.zeros_(self.logvar.bias)

    @classmethod
    def from_eps_model(cls, model: nn.Module, schedule: str, T: int = 1000) -> EDMPrecond:
        """An eps network trained on a discrete schedule (lesson 2's models) as D(x, sigma) with one sigma per row
        ('vp', Karras et al. 2022, Table 1): the function samplers.as_denoiser(model, schedule) computes, its weights
        copied (lesson 12's teachers and the students that start from them)."""
        config = getattr(model, "config", None)
        if getattr(model, "prediction", None) != "eps" or not isinstance(config, dict):
            raise ValueError("from_eps_model needs an eps-predicting course network (with .config), got "
                             f"{type(model).__name__} predicting {getattr(model, 'prediction', None)!r}")
        out = cls(config, precond="vp", schedule=schedule, T=T)
        out.net.load_state_dict(model.state_dict())
        return out

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, network time) per row."""
        if self.precond == "edm":
            sd2 = self.sigma_data ** 2
            total = sigma * sigma + sd2
            return sd2 / total, sigma * self.sigma_data / total.sqrt(), total.rsqrt(), TIME_SHIFT + TIME_SCALE * sigma.log() / 4
        log_s = sigma.log().clamp(float(self.log_sigmas[0]), float(self.log_sigmas[-1]))
        hi = torch.searchsorted(self.log_sigmas, log_s.float().contiguous()).clamp(1, len(self.log_sigmas) - 1)
        lo = hi - 1
        w = (log_s - self.log_sigmas[lo]) / (self.log_sigmas[hi] - self.log_sigmas[lo])
        return torch.ones_like(sigma), -sigma, (1 + sigma * sigma).rsqrt(), lo + w

    def forward(self, x: torch.Tensor, sigma, y=None, return_logvar: bool = False, **cond):
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 2 and sigma.shape[1] == 1:  # one per row as a column
            sigma = sigma[:, 0]
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be one number or one per row, shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        if not bool((sigma > 0).all()):
            raise ValueError("this denoiser takes noise levels sigma > 0 (the std of the noise added to x0)")
        c_skip, c_out, c_in, time = self.coefficients(sigma)
        shape = (-1,) + (1,) * (x.ndim - 1)
        kwargs = {**cond, **({} if y is None else {"y": y})}  # a text network's context= and mask= pass through
        f = self.net(x * c_in.reshape(shape).to(x.dtype), time, **kwargs)
        d = c_skip.reshape(shape).to(x.dtype) * x + c_out.reshape(shape).to(x.dtype) * f.to(x.dtype)
        if not return_logvar:
            return d
        if self.logvar is None:
            raise ValueError("return_logvar needs a network built with uncertainty=True")
        u = self.logvar(timestep_embedding(time, 32).to(x.dtype)).flatten()
        return d, u
