"""Editing with a trained diffusion model: inpainting (replacement, and RePaint's resampling, Lugmayr et al. 2022) and
SDEdit (Meng et al. 2022): noise an input part of the way, denoise it back.

Both work on any denoiser D(x, sigma) (course_lib.samplers) in the sigma view x = x0 + sigma eps.
"""
from __future__ import annotations

import inspect
import math

import torch

from .samplers import SAMPLERS, ancestral_step, as_denoiser, check_sigmas


@torch.no_grad()
def inpaint(denoiser, known: torch.Tensor, mask: torch.Tensor, sigmas, resample: int = 1,
            generator: torch.Generator | None = None, noise: torch.Tensor | None = None, schedule=None,
            **model_kwargs) -> torch.Tensor:
    """Fill in where mask is 0, keeping `known` where mask is 1, with DDPM posterior steps (Ho et al. 2020, eq. 7).

    Before each step the known region is replaced by `known` noised to the current level (the replacement method;
    Song et al. 2021, app. I); with resample = r > 1 each step is repeated r times, re-noising the result back to the
    current level in between (RePaint, Lugmayr et al. 2022, alg. 1 with jump length 1), which lets the generated
    part agree with the known part. The result equals `known` exactly where mask is 1.
    """
    if not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be a positive int, got {resample!r}")
    if not isinstance(known, torch.Tensor) or not known.is_floating_point():
        raise TypeError(f"known must be a floating-point tensor, got {type(known).__name__}")
    mask = torch.as_tensor(mask, device=known.device)
    try:
        mask = torch.broadcast_to(mask, known.shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to known's {tuple(known.shape)}") from None
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold 0 (to generate) and 1 (known) only")
    keep = mask.bool()
    den = as_denoiser(denoiser, schedule)
    sigmas = check_sigmas(sigmas)

    def draw(like):
        return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)

    x = (noise.to(known) if noise is not None else draw(known)) * math.sqrt(1 + float(sigmas[0]) ** 2)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        for r in range(resample):
            if keep.any():
                x = torch.where(keep, known + s * draw(known), x)
            x = ancestral_step(x, den(x, s, **model_kwargs), s, s_next, "posterior", generator)
            if r < resample - 1:  # back to level s: x0 + s eps from x0 + s_next eps adds variance s^2 - s_next^2
                x = x + math.sqrt(s * s - s_next * s_next) * draw(x)
    return torch.where(keep, known, x)


@torch.no_grad()
def sdedit(denoiser, image: torch.Tensor, sigma_start: float, sigmas, sampler: str = "ddim",
           generator: torch.Generator | None = None, schedule=None, **model_kwargs) -> torch.Tensor:
    """Noise `image` to sigma_start, then denoise it with `sampler` along the levels of `sigmas` below sigma_start
    (Meng et al. 2022): small sigma_start stays faithful to the input, large sigma_start makes it realistic."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    fn = SAMPLERS[sampler]
    sigmas = check_sigmas(sigmas)
    if not float(sigmas[-2]) < sigma_start:
        raise ValueError(f"sigma_start ({sigma_start}) must be above the smallest noise level ({float(sigmas[-2]):.3g})")
    below = sigmas[sigmas < sigma_start]
    path = torch.cat([torch.tensor([float(sigma_start)], dtype=sigmas.dtype), below])
    den = as_denoiser(denoiser, schedule)
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype).to(image.device)
    kwargs = {"generator": generator} if "generator" in inspect.signature(fn).parameters else {}
    return fn(den, image + sigma_start * noise, path, **kwargs, **model_kwargs)
