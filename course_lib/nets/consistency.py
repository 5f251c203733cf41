"""A consistency model's network (Song et al. 2023, sec. 3): f(x, sigma) = c_skip(sigma) x + c_out(sigma) D(x, sigma)
over a denoiser network D, so that f(x, sigma_min) = x whatever D does (the boundary condition)."""
from __future__ import annotations

import torch
from torch import nn

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 80.0, 0.5  # as course_lib.consistency (which this module may not import)


class ConsistencyNet(nn.Module):
    """Wraps a denoiser (an `edm_precond` config: D(x, sigma) with sigma per row) as a consistency function. Its output
    estimates x0, so `.prediction` is 'edm' (samplers.as_denoiser takes it); its own sampler is
    consistency.multistep_sample over `.sigma_max` and lower levels."""

    def __init__(self, denoiser: dict, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX):
        super().__init__()
        from . import build_model

        if not isinstance(denoiser, dict) or denoiser.get("kind") != "edm_precond":
            raise ValueError(f"denoiser must be an edm_precond config (a network made D(x, sigma)), got {denoiser!r}")
        if not 0 < sigma_min < sigma_max or not sigma_data > 0:
            raise ValueError(f"need 0 < sigma_min < sigma_max and sigma_data > 0, got {sigma_min}, {sigma_max}, "
                             f"{sigma_data}")
        self.denoiser = build_model(denoiser)
        self.config = dict(kind="consistency", denoiser=self.denoiser.config, sigma_data=float(sigma_data),
                           sigma_min=float(sigma_min), sigma_max=float(sigma_max))
        self.prediction, self.sigma_data = "edm", float(sigma_data)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.num_classes = self.denoiser.num_classes

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) per row: 1 and 0 at sigma_min, about 0 and 1 far above sigma_data."""
        s = sigma - self.sigma_min
        total = s * s + self.sigma_data ** 2
        return self.sigma_data ** 2 / total, s / total.sqrt()

    def forward(self, x: torch.Tensor, sigma, y=None, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(-1)
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be one number or one per row ({x.shape[0]},), got shape {tuple(sigma.shape)}")
        if not bool((sigma >= self.sigma_min * (1 - 1e-6)).all()):
            raise ValueError(f"a consistency function is defined for sigma >= sigma_min = {self.sigma_min}")
        c_skip, c_out = (c.reshape((-1,) + (1,) * (x.ndim - 1)).to(x.dtype) for c in self.coefficients(sigma))
        return c_skip * x + c_out * self.denoiser(x, sigma, y, **cond)  # cond: a text denoiser's context=, mask=
