"""Editing with a trained diffusion model: inpainting (replacement, and RePaint's resampling, Lugmayr et al. 2022) and
SDEdit (Meng et al. 2022): noise an input part of the way, denoise it back.

Both work on any denoiser D(x, sigma) (course_lib.samplers) in the sigma view x = x0 + sigma eps.
"""
from __future__ import annotations

import inspect
import math

import torch

from .samplers import SAMPLERS, ancestral_step, as_denoiser, check_sigmas


def repaint_path(n_steps: int, resample: int = 1, jump: int = 1) -> list[int]:
    """The order in which RePaint visits noise-level indices 0 (most noise) .. n_steps (clean): down `jump` steps,
    then back up `jump` and down again, `resample - 1` times per block (Lugmayr et al. 2022, sec. 4.2)."""
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    for name, v in (("resample", resample), ("jump", jump)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    path = [0]
    for start in range(0, n_steps, jump):
        end = min(start + jump, n_steps)
        passes = resample if end < n_steps else 1
        for r in range(passes):
            path += list(range(start + 1, end + 1))
            if r < passes - 1:
                path += list(range(end - 1, start - 1, -1))
    return path


@torch.no_grad()
def inpaint(denoiser, known: torch.Tensor, mask: torch.Tensor, sigmas, resample: int = 1, jump: int = 1,
            generator: torch.Generator | None = None, noise: torch.Tensor | None = None, schedule=None,
            **model_kwargs) -> torch.Tensor:
    """Fill in where mask is 0, keeping `known` where mask is 1, with DDPM posterior steps (Ho et al. 2020, eq. 7).

    Before each step down the known region is replaced by `known` noised to the current level (the replacement
    method; Song et al. 2021, app. I). With resample = r > 1, every block of `jump` steps is walked r times: after
    each pass but the last the result is re-noised back up to the block's first level, one level at a time (RePaint,
    Lugmayr et al. 2022, alg. 1 and sec. 4.2; they use jump 10, r 10), which lets the generated part agree with the
    known part. The last block is not repeated (there is no noise left to harmonise with). Costs about r times the
    evaluations of replacement. The result equals `known` exactly where mask is 1.
    """
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
    path = repaint_path(len(sigmas) - 1, resample, jump)

    def draw(like):
        return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)

    x = (noise.to(known) if noise is not None else draw(known)) * math.sqrt(1 + float(sigmas[0]) ** 2)
    for a, b in zip(path[:-1], path[1:]):
        s, s_next = float(sigmas[a]), float(sigmas[b])
        if b > a:  # down one level: put the known part in at this level, then one posterior step
            if keep.any():
                x = torch.where(keep, known + s * draw(known), x)
            x = ancestral_step(x, den(x, s, **model_kwargs), s, s_next, "posterior", generator)
        else:  # back up one level: x0 + s eps from x0 + s_next eps... here s < s_next: add variance s_next^2 - s^2
            x = x + math.sqrt(s_next * s_next - s * s) * draw(x)
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


def inpainting_spread(mean: torch.Tensor, cov: torch.Tensor, known: torch.Tensor, resample: int, n: int = 2000,
                      n_steps: int = 45, generator: torch.Generator | None = None) -> tuple[float, float]:
    """How well `inpaint` samples a Gaussian's exact conditional: completions of n rows of N(mean, cov) (coordinates
    where `known` is True kept) with the exact denoiser on n_steps Karras levels, whitened by the true conditional
    covariance about each row's true conditional mean; returns the smallest and largest eigenvalue of their covariance
    (both 1 for exact conditional samples)."""
    from .analytic import gaussian_conditional, multivariate_gaussian_denoiser
    from .step_schedules import karras_sigmas

    mean, cov = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
    known = torch.as_tensor(known, dtype=torch.bool)
    if known.shape != mean.shape or not known.any() or known.all():
        raise ValueError("known must be a bool mask over mean's coordinates with both True and False entries")
    rows = mean + torch.randn(n, len(mean), generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    sigmas = karras_sigmas(n_steps, 0.01, 20.0, 7.0).double()
    x = inpaint(multivariate_gaussian_denoiser(mean, cov), rows, known.expand(n, -1).double(), sigmas,
                resample=resample, generator=generator)
    cond_mean, cond_cov = gaussian_conditional(mean, cov, known, rows[:, known])
    w = torch.linalg.solve_triangular(torch.linalg.cholesky(cond_cov), (x[:, ~known] - cond_mean).T, upper=False).T
    eig = torch.linalg.eigvalsh(torch.cov(w.T).reshape(w.shape[1], w.shape[1]))
    return float(eig.min()), float(eig.max())
