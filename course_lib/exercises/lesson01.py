"""Lessons 0 and 1: noising images, alpha-bar from betas, the closed-form q(x_t | x_0), the log-SNR."""
from __future__ import annotations

import torch

from .. import schedules
from . import Exercise, register
from .common import _RESHAPE_HINT, DIFFUSION_LIBRARIES, DIFFUSION_RULE, _batch, _per_sample


def ref_noise_images(x, sigma, noise):
    """Lesson 0 warm-up: x + sigma * noise with one sigma per sample."""
    return x + _per_sample(sigma, x) * noise


def _inputs_noise_images(gen):
    b, shape = _batch(gen)
    return {"x": torch.rand(shape, generator=gen) * 2 - 1, "sigma": torch.rand(b, generator=gen) * 2,
            "noise": torch.randn(shape, generator=gen)}


register(Exercise(
    "noise_images", 0, ref_noise_images, _inputs_noise_images,
    "Each sample i gets x[i] + sigma[i] * noise[i]. " + _RESHAPE_HINT,
    mistakes=((lambda x, sigma, noise: x + sigma.mean() * noise, "Use each sample's own sigma[i], not one shared value."),
              (lambda x, sigma, noise: x + _per_sample(sigma, x) ** 2 * noise,
               "sigma is a standard deviation: multiply the noise by sigma, not sigma squared."),
              (lambda x, sigma, noise: _per_sample(sigma, x) * noise, "Keep the image: the result is x plus the noise."))))


def ref_alpha_bar_from_betas(betas):
    """alpha_bar[t] = prod_{s<=t} (1 - beta[s]) (Ho et al. 2020, eq. 4)."""
    return schedules.alpha_bar_from_betas(betas)


def _inputs_betas(gen):
    n = int(torch.randint(5, 60, (1,), generator=gen))
    return {"betas": (1e-4 + 0.1 * torch.rand(n, generator=gen)).double()}


register(Exercise(
    "alpha_bar_from_betas", 1, ref_alpha_bar_from_betas, _inputs_betas,
    "alpha_t = 1 - beta_t, and alpha_bar_t is the running product alpha_0 * ... * alpha_t (torch.cumprod).",
    mistakes=((lambda betas: torch.cumsum(1 - betas, 0), "Use a running product (torch.cumprod), not a sum."),
              (lambda betas: torch.cumprod(betas, 0), "The product is over alpha_t = 1 - beta_t, not over beta_t."),
              (lambda betas: torch.cat([betas.new_ones(1), torch.cumprod(1 - betas, 0)[:-1]]),
               "Off by one: alpha_bar[0] already includes the first step, alpha_bar[0] = 1 - beta[0]."),
              (lambda betas: 1 - torch.cumprod(1 - betas, 0), "That is 1 - alpha_bar: return alpha_bar itself."),
              (lambda betas: torch.prod(1 - betas).expand(len(betas)),
               "Return one value per step (the running product), not the total product.")),
    refused=DIFFUSION_LIBRARIES, rule=DIFFUSION_RULE))


def ref_q_sample(x0, t, alpha_bar, noise):
    """x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise, per sample (Ho et al. 2020, eq. 4)."""
    ab = _per_sample(alpha_bar[t], x0).to(x0.dtype)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def _inputs_q_sample(gen):
    b, shape = _batch(gen)
    T = int(torch.randint(20, 200, (1,), generator=gen))
    betas = torch.linspace(1e-4, 0.05, T, dtype=torch.float64) * (0.5 + torch.rand(1, generator=gen).double())
    return {"x0": torch.rand(shape, generator=gen) * 2 - 1, "t": torch.randint(T, (b,), generator=gen),
            "alpha_bar": schedules.alpha_bar_from_betas(betas).float(), "noise": torch.randn(shape, generator=gen)}


def _q_sample_mistake(f):
    def wrong(x0, t, alpha_bar, noise):
        ab = _per_sample(alpha_bar[t], x0)
        return f(ab, x0, noise)
    return wrong


register(Exercise(
    "q_sample", 1, ref_q_sample, _inputs_q_sample,
    "x_t = sqrt(alpha_bar[t]) * x0 + sqrt(1 - alpha_bar[t]) * noise, with alpha_bar[t] of shape (B,) reshaped "
    "to broadcast over the sample's other dimensions. " + _RESHAPE_HINT,
    mistakes=((_q_sample_mistake(lambda ab, x0, n: ab * x0 + (1 - ab) * n),
               "Take square roots: the mean is sqrt(alpha_bar) x0 and the standard deviation sqrt(1 - alpha_bar)."),
              (_q_sample_mistake(lambda ab, x0, n: (1 - ab).sqrt() * x0 + ab.sqrt() * n),
               "The weights are swapped: x0 is scaled by sqrt(alpha_bar), the noise by sqrt(1 - alpha_bar)."),
              (_q_sample_mistake(lambda ab, x0, n: ab.sqrt() * x0 + (1 - ab) * n),
               "The noise is scaled by the standard deviation sqrt(1 - alpha_bar), not the variance."),
              (lambda x0, t, alpha_bar, noise: ref_q_sample(x0, t - 1, alpha_bar, noise),
               "Off by one: use alpha_bar[t] itself (our t counts from 0).")),
    refused=DIFFUSION_LIBRARIES, rule=DIFFUSION_RULE))


def ref_log_snr(alpha_bar):
    """log SNR = log(alpha_bar / (1 - alpha_bar)) (Kingma et al. 2021, eq. 2)."""
    return schedules.log_snr_from_alpha_bar(alpha_bar).to(alpha_bar.dtype)


def _inputs_log_snr(gen):
    n = int(torch.randint(5, 60, (1,), generator=gen))
    return {"alpha_bar": torch.rand(n, generator=gen).double() * 0.998 + 0.001}


register(Exercise(
    "log_snr", 1, ref_log_snr, _inputs_log_snr,
    "The signal variance is alpha_bar and the noise variance 1 - alpha_bar; log-SNR is the log of their ratio.",
    mistakes=((lambda alpha_bar: alpha_bar / (1 - alpha_bar), "That is the SNR itself: take its logarithm."),
              (lambda alpha_bar: torch.log((1 - alpha_bar) / alpha_bar),
               "Sign flipped: signal over noise is alpha_bar / (1 - alpha_bar)."),
              (lambda alpha_bar: torch.log(alpha_bar.sqrt() / (1 - alpha_bar).sqrt()),
               "SNR is a ratio of variances, not of standard deviations: drop the square roots.")),
    refused=DIFFUSION_LIBRARIES, rule=DIFFUSION_RULE))
