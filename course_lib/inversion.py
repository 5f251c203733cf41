"""DDIM inversion (Song, Meng & Ermon 2021, sec. 4.3; Dhariwal & Nichol 2021, app. F; as used for editing by Mokady
et al. 2023, sec. 3): run deterministic DDIM backwards, from an image up to noise, so that sampling that noise with
DDIM gives the image back, and sampling it with another prompt edits the image.

Works on any denoiser D(x, sigma) (course_lib.samplers) in the sigma view x = x0 + sigma eps. A DDIM step from sigma
to sigma' is x' = D(x, sigma) + (sigma' / sigma) (x - D(x, sigma)); inversion takes the same step upwards, with D at
the level it starts from (the value at the level it goes to is not known yet): the approximation whose error grows
with the step size, so reconstruction improves with more steps.
"""
from __future__ import annotations

import torch

from .nets.autoencoder import psnr  # noqa: F401  (PSNR in dB for images in [-1, 1], re-exported)
from .samplers import _steps, check_sigmas, sample_ddim


@torch.no_grad()
def ddim_invert(denoiser, x0: torch.Tensor, sigmas, progress: bool = False, return_trajectory: bool = False,
                **model_kwargs):
    """The noise at sigmas[0] that DDIM on `sigmas` (descending, a sampler's grid ending at 0) maps back to about x0.

    x0 is taken as the state at the smallest positive level sigmas[-2] (the last sampling step, sigmas[-2] -> 0, only
    denoises); each step up is x_{i} = D(x_{i+1}, s_{i+1}) + (s_i / s_{i+1}) (x_{i+1} - D(x_{i+1}, s_{i+1})). Returns
    the noise (in the sigma view: its std is about sigmas[0]), and with return_trajectory the states from x0 up."""
    sigmas = check_sigmas(sigmas)
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a float tensor (a batch of clean samples), got {type(x0).__name__}")
    levels = sigmas[:-1] if float(sigmas[-1]) == 0 else sigmas
    if len(levels) < 2:
        raise ValueError("inversion needs at least two positive noise levels (one step up); got sigmas "
                         f"{sigmas.tolist()}")
    up = levels.flip(0)  # ascending: the smallest positive level first
    x, states = x0, [x0.cpu()]
    for _, s, s_next in _steps(up, progress, "DDIM inversion"):
        d = denoiser(x, s, **model_kwargs)
        x = d + (s_next / s) * (x - d)
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"DDIM inversion produced non-finite values at sigma {s_next:.4g}")
        if return_trajectory:
            states.append(x.cpu())
    return (x, torch.stack(states)) if return_trajectory else x


@torch.no_grad()
def reconstruct(denoiser, x0: torch.Tensor, sigmas, sample_kwargs: dict | None = None, **model_kwargs):
    """DDIM inversion of x0 on `sigmas`, then DDIM sampling back down the same levels: (reconstruction, noise).
    `sample_kwargs` (default: model_kwargs) condition the way down: another prompt's there edits the image."""
    noise = ddim_invert(denoiser, x0, sigmas, **model_kwargs)
    down = model_kwargs if sample_kwargs is None else sample_kwargs
    return sample_ddim(denoiser, noise, check_sigmas(sigmas), **down), noise


@torch.no_grad()
def edit(model, images: torch.Tensor, source, target, steps: int = 50, scale: float = 1.0,
         invert_scale: float = 1.0, invert=None) -> torch.Tensor:
    """Edit real images by inversion (lesson 13): encode them (a latent model), DDIM-invert under the `source`
    captions with guidance `invert_scale` (1: none, which inverts best), then DDIM-sample the noise back under the
    `target` captions at `scale`, on `steps` Karras levels from lesson 7's sigma_max. Same captions: a reconstruction.
    `invert(denoise, x0, sigmas)` replaces ddim_invert (e.g. a learner's, with denoise(x, sigma) bound to the source
    captions)."""
    from .autoencoder import encode
    from .step_schedules import karras_sigmas
    from .text2image import SIGMA_MAX

    source = [source] * len(images) if isinstance(source, str) else list(source)
    target = [target] * len(images) if isinstance(target, str) else list(target)
    if not len(source) == len(target) == len(images):
        raise ValueError(f"{len(images)} images need as many source and target captions, got {len(source)} and "
                         f"{len(target)}")
    x = encode(model.autoencoder, images) * model.scale_factor if model.autoencoder is not None else images
    down = model.denoiser(invert_scale)
    sigmas = karras_sigmas(steps, float(down.sigma_min), SIGMA_MAX)
    src_c, src_m = model.condition(source)
    if invert is None:
        noise = ddim_invert(down, x, sigmas, context=src_c, mask=src_m)
    else:
        with torch.no_grad():
            noise = invert(lambda y, s: down(y, s, context=src_c, mask=src_m), x, sigmas)
    tgt_c, tgt_m = model.condition(target)
    return model.to_images(sample_ddim(model.denoiser(scale), noise, sigmas, context=tgt_c, mask=tgt_m))
