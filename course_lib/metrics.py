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
