"""Lesson 4, graded on values: the reparameterization trick, the Gaussian ELBO, the discriminator's loss."""
from __future__ import annotations

import math

import torch

from . import Exercise, register


def ref_reparameterize(mu, logvar, noise):
    """z = mu + exp(logvar / 2) * noise (Kingma & Welling 2014, eq. 10)."""
    return mu + torch.exp(0.5 * logvar) * noise


def _inputs_reparameterize(gen):
    b, k = int(torch.randint(2, 9, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
    return {"mu": torch.randn(b, k, generator=gen), "logvar": torch.randn(b, k, generator=gen),
            "noise": torch.randn(b, k, generator=gen)}


register(Exercise(
    "reparameterize", 4, ref_reparameterize, _inputs_reparameterize,
    "logvar is log(sigma^2), so sigma = exp(logvar / 2); return mu + sigma * noise.",
    mistakes=((lambda mu, logvar, noise: mu + torch.exp(logvar) * noise,
               "exp(logvar) is the variance sigma^2; scale the noise by the standard deviation exp(logvar / 2)."),
              (lambda mu, logvar, noise: mu + logvar * noise,
               "logvar is a log-variance, not a standard deviation: use exp(logvar / 2)."),
              (lambda mu, logvar, noise: mu + torch.exp(0.5 * logvar),
               "Multiply the standard deviation by the given noise: that is what makes z random."))))


def ref_gaussian_elbo(x, mean, log_scale, mu, logvar):
    """Per-sample ELBO: log N(x; mean, exp(log_scale)^2) summed over dims, minus KL(N(mu, exp(logvar)) || N(0, I))."""
    log_px = (-0.5 * ((x - mean) / log_scale.exp()) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)).sum(1)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    return log_px - kl


def _inputs_elbo(gen):
    b, d, k = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((2, 9), (1, 10), (1, 6)))
    return {"x": torch.randn(b, d, generator=gen), "mean": torch.randn(b, d, generator=gen),
            "log_scale": 0.5 * torch.randn(b, d, generator=gen), "mu": torch.randn(b, k, generator=gen),
            "logvar": 0.5 * torch.randn(b, k, generator=gen)}


def _elbo_without_constant(x, mean, log_scale, mu, logvar):
    return ref_gaussian_elbo(x, mean, log_scale, mu, logvar) + 0.5 * math.log(2 * math.pi) * x.shape[1]


register(Exercise(
    "gaussian_elbo", 4, ref_gaussian_elbo, _inputs_elbo,
    "ELBO = log p(x|z) - KL. log p(x|z) = sum over dims of -(x - mean)^2 / (2 s^2) - log s - log(2 pi) / 2 with "
    "s = exp(log_scale); KL = sum over latents of (mu^2 + exp(logvar) - 1 - logvar) / 2. Return shape (B,).",
    mistakes=((lambda x, mean, log_scale, mu, logvar: ref_gaussian_elbo(x, mean, log_scale, mu, logvar)
               + 2 * 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1),
               "The KL term is subtracted: ELBO = reconstruction - KL."),
              (_elbo_without_constant,
               "Keep the constant -log(2 pi) / 2 per dimension: without it the number is not a log-likelihood bound."),
              (lambda x, mean, log_scale, mu, logvar: ref_gaussian_elbo(x, mean, log_scale, mu, logvar).mean(),
               "Return one ELBO per sample, shape (B,), not the batch mean."))))


def ref_discriminator_loss(real_logits, fake_logits):
    """-log sigmoid(real) - log(1 - sigmoid(fake)), each averaged over its batch (Goodfellow et al. 2014, eq. 1)."""
    return torch.nn.functional.softplus(-real_logits).mean() + torch.nn.functional.softplus(fake_logits).mean()


def _inputs_discriminator(gen):
    n, m = int(torch.randint(2, 30, (1,), generator=gen)), int(torch.randint(2, 30, (1,), generator=gen))
    return {"real_logits": 3 * torch.randn(n, generator=gen), "fake_logits": 3 * torch.randn(m, generator=gen)}


register(Exercise(
    "discriminator_loss", 4, ref_discriminator_loss, _inputs_discriminator,
    "D wants sigmoid(real) -> 1 and sigmoid(fake) -> 0: loss = mean(-log sigmoid(real)) + mean(-log(1 - sigmoid(fake))). "
    "softplus(-a) = -log sigmoid(a) is the stable way to write it.",
    mistakes=((lambda real_logits, fake_logits: ref_discriminator_loss(fake_logits, real_logits),
               "Real and fake are swapped: the discriminator should call real samples real (logit > 0)."),
              (lambda real_logits, fake_logits: torch.nn.functional.softplus(-real_logits).mean()
               + torch.nn.functional.softplus(-fake_logits).mean(),
               "For the fakes use -log(1 - sigmoid(fake)) = softplus(fake), not -log sigmoid(fake) (that is G's loss)."),
              (lambda real_logits, fake_logits: torch.nn.functional.softplus(-real_logits).sum()
               + torch.nn.functional.softplus(fake_logits).sum(),
               "Average each term over its batch instead of summing."),
              (lambda real_logits, fake_logits: torch.nn.functional.softplus(-torch.cat([real_logits, fake_logits])).mean(),
               "The fakes need the opposite target: -log(1 - sigmoid(fake))."))))
