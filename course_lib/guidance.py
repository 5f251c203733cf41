"""Guided denoisers: classifier-free guidance (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021).

Each wraps a denoiser D(x, sigma, y=...) (course_lib.samplers) and is itself one, so every sampler of lesson 3 runs
it unchanged: `sample(classifier_free(den, scale=3.0), noise, steps=10, model_kwargs={"y": labels})`. Scales use the
convention of diffusers' `guidance_scale`: 0 is the unconditional model, 1 the conditional one, above 1 guidance.
"""
from __future__ import annotations

import math

import torch

from .samplers import Denoiser, as_denoiser, timesteps_for_sigma


def _labels(y, x: torch.Tensor, null_label: int) -> torch.Tensor:
    """y as a (B,) long tensor of real classes 0..null_label-1 (the 'no label' index itself is not a class)."""
    if y is None:
        raise ValueError("a guided denoiser needs the labels to guide towards: pass y= (model_kwargs={'y': labels})")
    y = torch.as_tensor(y, device=x.device)
    y = y.expand(x.shape[0]) if y.ndim == 0 else y
    if y.is_floating_point() or y.shape != (x.shape[0],):
        raise ValueError(f"y must hold {x.shape[0]} integer labels, got {tuple(y.shape)} {y.dtype}")
    if (y < 0).any() or (y >= null_label).any():
        raise ValueError(f"labels must be classes 0..{null_label - 1} ({null_label} is the 'no label' index), "
                         f"got values from {int(y.min())} to {int(y.max())}")
    return y.long()


def caption_guided(net, x: torch.Tensor, sigma, context: torch.Tensor, mask: torch.Tensor,
                   null_context: torch.Tensor, null_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """net(x, sigma, empty) + scale (net(x, sigma, c) - net(x, sigma, empty)) (Ho & Salimans 2022, eq. 6) with both
    halves in one batch of 2B; sigma a number or one per row; the empty caption's (1, L, D) states and (1, L) mask."""
    b = x.shape[0]
    if torch.is_tensor(sigma) and sigma.ndim > 0:
        sigma = sigma.reshape(-1).expand(b)
        sigma = torch.cat([sigma, sigma])
    both = net(torch.cat([x, x]), sigma, context=torch.cat([context, null_context.expand(b, -1, -1)]),
               mask=torch.cat([mask, null_mask.expand(b, -1)]))
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)


def null_label_of(model) -> int:
    """The 'no label' index of a class-conditional network (its number of classes), or a ValueError if it has none."""
    config = getattr(model, "config", None) or {}
    k = config.get("num_classes")
    if not isinstance(k, int) or k < 1:
        raise ValueError("this model has no 'no label' index (it was trained without class labels, num_classes="
                         f"{k!r}): classifier-free guidance needs a model trained with label dropout, such as "
                         "load_pretrained('digits_cond'); for an unconditional model use classifier_guidance")
    return k


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"the guidance scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


def _like(inner: Denoiser, fn) -> Denoiser:
    return Denoiser(fn, inner.sigma_min, inner.sigma_max, inner.clip, inner.schedule, inner.sampling)


def classifier_free(denoiser, scale: float, null_label: int | None = None, uncond=None, interval=None,
                    rescale: float = 0.0, schedule=None) -> Denoiser:
    """D_w(x, sigma, y) = D(x, sigma) + w (D(x, sigma, y) - D(x, sigma)): Ho & Salimans (2022), eq. 6, written for
    x0-predictions (it is the same combination for eps, which is affine in x0 with weights summing to 1).

    `denoiser` is a class-conditional network (with its schedule) or a Denoiser taking y; the unconditional
    prediction is the same network called with the 'no label' index `null_label` (read from the network when not
    given), or `uncond`, a separate denoiser. Both are evaluated in one batch of 2B when they are one network.
    `interval=(sigma_lo, sigma_hi)`: guide only for sigma_lo < sigma <= sigma_hi and use the conditional prediction
    elsewhere (Kynkaanniemi et al. 2024), one evaluation instead of two there. `rescale` in [0, 1]: mix in the guided
    noise prediction rescaled to the conditional one's standard deviation per sample (Lin et al. 2024, eq. 15-16, in
    eps space as diffusers' `guidance_rescale`).
    """
    w = _check_scale(scale)
    if not 0 <= rescale <= 1:
        raise ValueError(f"rescale must be in [0, 1], got {rescale!r}")
    if interval is not None:
        lo, hi = (float(v) for v in interval)
        if not 0 <= lo < hi:
            raise ValueError(f"interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi, got {interval!r}")
    if uncond is None and null_label is None:
        null_label = null_label_of(denoiser)
    inner = denoiser if isinstance(denoiser, Denoiser) else as_denoiser(denoiser, schedule)
    other = None if uncond is None else as_denoiser(uncond, schedule)
    k = null_label if null_label is not None else None

    def fn(x, sigma, y=None, **kwargs):
        if k is not None:
            y = _labels(y, x, k)
        elif y is None:
            raise ValueError("a guided denoiser needs the labels to guide towards: pass y=")
        if interval is not None and not lo < sigma <= hi:
            return inner.fn(x, sigma, y=y, **kwargs)
        if other is not None:
            cond, unc = inner.fn(x, sigma, y=y, **kwargs), other.fn(x, sigma, **kwargs)
        else:
            both = inner.fn(torch.cat([x, x]), sigma, y=torch.cat([y, torch.full_like(y, k)]), **kwargs)
            cond, unc = both.chunk(2)
        guided = unc + w * (cond - unc)
        if rescale > 0:
            eps_cond, eps_cfg = (x - cond) / sigma, (x - guided) / sigma
            dims = tuple(range(1, x.ndim))
            ratio = eps_cond.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True).clamp_min(1e-12)
            eps = rescale * eps_cfg * ratio + (1 - rescale) * eps_cfg
            guided = x - sigma * eps
        return guided

    return _like(inner, fn)


def classifier_log_prob(classifier, schedule=None):
    """A classifier of noisy data as log p(y | x, sigma) in the sigma view (x = x0 + sigma eps).

    `classifier` is either fn(x, sigma) -> logits already in that view (course_lib.analytic's exact ones), or a
    noise-aware network clf(x_t, t) -> logits trained in the alpha-bar view of `schedule` (x_t = sqrt(ab) x)."""
    if schedule is None:
        return lambda x, sigma: torch.log_softmax(classifier(x, sigma), dim=1)

    def fn(x, sigma):
        x_t = x * math.sqrt(1.0 / (1.0 + sigma * sigma))  # the same point in the alpha-bar view
        return torch.log_softmax(classifier(x_t, timesteps_for_sigma(schedule, sigma, x)), dim=1)

    return fn


def classifier_guidance(denoiser, log_prob, scale: float, schedule=None, num_classes: int | None = None) -> Denoiser:
    """D_s(x, sigma, y) = D(x, sigma) + s sigma^2 grad_x log p(y | x, sigma): Dhariwal & Nichol (2021), alg. 1, in the
    denoiser's terms (D = x + sigma^2 score, Tweedie's formula), so s = 1 targets p(x | y) exactly.

    `denoiser` is an unconditional model (with its schedule) or Denoiser; `log_prob(x, sigma)` returns (B, classes)
    log-probabilities (see classifier_log_prob). The gradient is taken with autograd, also inside a sampler's
    torch.no_grad()."""
    s = _check_scale(scale)
    inner = denoiser if isinstance(denoiser, Denoiser) else as_denoiser(denoiser, schedule)

    def fn(x, sigma, y=None, **kwargs):
        if y is None:
            raise ValueError("a guided denoiser needs the labels to guide towards: pass y=")
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            lp = log_prob(xg, sigma)
            k = lp.shape[1] if num_classes is None else num_classes
            labels = _labels(y, x, k)
            (grad,) = torch.autograd.grad(lp.gather(1, labels[:, None]).sum(), xg)
        return inner.fn(x, sigma, **kwargs) + s * sigma**2 * grad.detach()

    return _like(inner, fn)


def load_noisy_classifier(path=None, device=None):
    """The shipped noise-aware digits classifier (data/digits_noisy_classifier.pt, trained by
    `python -m course_lib train --preset digits_noisy_classifier`) as log p(y | x, sigma), ready for
    classifier_guidance; its card (accuracy per noise level) is on `.card` of the returned function."""
    from .checkpoints import load_model, shipped_dir
    from .schedules import NoiseSchedule

    loaded = load_model(path or shipped_dir() / "digits_noisy_classifier.pt", device)
    if loaded.config.get("family") != "classifier":
        raise ValueError(f"{path} holds no noise-aware classifier (family {loaded.config.get('family')!r})")
    fn = classifier_log_prob(loaded.model, NoiseSchedule.named(loaded.config["schedule"], loaded.config["T"]))
    fn.card, fn.model = loaded.card, loaded.model
    return fn
