"""Sample-quality metrics with known answers: high-quality fraction and modes covered on 2D mixtures."""
from __future__ import annotations

import torch

from .data import GaussianMixture2D


def _check_points(samples) -> torch.Tensor:
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"samples must be a torch.Tensor, got {type(samples).__name__}")
    if samples.ndim != 2 or samples.shape[1] != 2 or samples.shape[0] == 0:
        raise ValueError(f"samples must have shape (n, 2) with n >= 1, got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise ValueError(f"samples contain {int((~torch.isfinite(samples)).any(1).sum())} non-finite points")
    return samples.detach().float().cpu()


def nearest_mode(samples: torch.Tensor, mixture: GaussianMixture2D) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of, and distance in units of std to, each sample's nearest mode."""
    d = torch.cdist(_check_points(samples), mixture.modes.float()) / mixture.std
    dist, idx = d.min(dim=1)
    return idx, dist


def hq_fraction(samples: torch.Tensor, mixture: GaussianMixture2D, k: float = 3.0) -> float:
    """Fraction of samples within k standard deviations of their nearest mode (Srivastava et al. 2017, VEEGAN)."""
    _, dist = nearest_mode(samples, mixture)
    return float((dist <= k).float().mean())


def mode_counts(samples: torch.Tensor, mixture: GaussianMixture2D, k: float = 3.0) -> torch.Tensor:
    """Number of high-quality samples (within k std) that land on each mode, shape (K,)."""
    idx, dist = nearest_mode(samples, mixture)
    return torch.bincount(idx[dist <= k], minlength=len(mixture.modes))


def modes_covered(samples: torch.Tensor, mixture: GaussianMixture2D, k: float = 3.0, min_count: int = 1) -> int:
    """Number of modes with at least min_count high-quality samples (Srivastava et al. 2017, VEEGAN)."""
    return int((mode_counts(samples, mixture, k) >= min_count).sum())


def hq_fraction_expected(k: float = 3.0) -> float:
    """The high-quality fraction of exact samples: P(|z| <= k) for a 2D standard normal, 1 - exp(-k^2/2)."""
    return 1.0 - float(torch.exp(torch.tensor(-k * k / 2)))


def mode_recovery_accuracy(xt: torch.Tensor, labels: torch.Tensor, mixture: GaussianMixture2D,
                           alpha_bar: float) -> float:
    """Accuracy of the Bayes-optimal guess of each point's mode from x_t ~ q(x_t|x_0): 1 = all information kept, 1/K = none.

    Under the forward process a mode k becomes N(sqrt(ab) mu_k, (ab std^2 + 1 - ab) I), so with equal weights
    the optimal guess is the nearest scaled mode (Bishop 2006, sec. 4.2).
    """
    if not 0 < float(alpha_bar) <= 1:
        raise ValueError(f"alpha_bar must lie in (0, 1], got {alpha_bar}")
    if labels.shape != (xt.shape[0],):
        raise ValueError(f"labels must have shape ({xt.shape[0]},), got {tuple(labels.shape)}")
    scaled = mixture.modes.float() * float(alpha_bar) ** 0.5
    guess = torch.cdist(_check_points(xt), scaled).argmin(dim=1)
    return float((guess == labels.cpu()).float().mean())
