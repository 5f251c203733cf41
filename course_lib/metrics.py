"""Sample-quality metrics: high-quality fraction and modes covered on 2D mixtures, distances between sample sets
(Frechet distance, KID, precision / recall, density / coverage).

Libraries used where they do the job: POT (Python Optimal Transport) for the sliced Wasserstein distance,
NumPy's symmetric eigensolver for the Frechet distance.
"""
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


def _check_features(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must have shape (n, d) with n >= 2, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x.detach().double().cpu()


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 512, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two point sets (Rabin et al. 2011), via POT's Monte-Carlo estimate."""
    import ot

    x, y = _check_features(x, "x"), _check_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    return float(ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), n_projections=n_projections, seed=seed))


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """|mu_x - mu_y|^2 + tr(C_x + C_y - 2 (C_x C_y)^(1/2)) between Gaussians fitted to two feature sets (Heusel et al. 2017).

    tr((C_x C_y)^(1/2)) is computed as the sum of the square roots of the eigenvalues of C_x^(1/2) C_y C_x^(1/2), a
    symmetric positive semi-definite matrix with the same eigenvalues as C_x C_y: exact and warning-free when the
    covariances are singular (fewer samples than features), where a general matrix square root is not."""
    import numpy as np

    x, y = _check_features(x, "x"), _check_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    mu1, mu2 = x.double().mean(0).numpy(), y.double().mean(0).numpy()
    c1 = np.atleast_2d(np.cov(x.double().numpy(), rowvar=False))
    c2 = np.atleast_2d(np.cov(y.double().numpy(), rowvar=False))
    w, v = np.linalg.eigh(c1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ c2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * trace_sqrt)


def _kth_neighbour_distance(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the k-th nearest other point (the 1st is the point itself)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of fakes inside the real manifold
    (the union of k-NN balls around real points), and the share of reals inside the fake manifold."""
    real, fake = _check_features(real, "real"), _check_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must have the same dimension, got {real.shape[1]} and {fake.shape[1]}")
    if not isinstance(k, int) or not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k must be an int in [1, {min(len(real), len(fake)) - 1}], got {k!r}")
    d = torch.cdist(real, fake)  # (n_real, n_fake)
    precision = (d < _kth_neighbour_distance(real, k)[:, None]).any(0).double().mean()
    recall = (d < _kth_neighbour_distance(fake, k)[None, :]).any(1).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict:
    """Density and coverage (Naeem et al. 2020): density counts how many real k-NN balls hold each fake (divided by k;
    about 1 when fakes are distributed as the reals, and unlike precision not fooled by one real outlier's big ball);
    coverage is the share of real balls that hold at least one fake (a dropped mode leaves its balls empty)."""
    real, fake = _check_features(real, "real"), _check_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must have the same dimension, got {real.shape[1]} and {fake.shape[1]}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < len(real):
        raise ValueError(f"k must be an int in [1, {len(real) - 1}], got {k!r}")
    inside = torch.cdist(real, fake) < _kth_neighbour_distance(real, k)[:, None]  # (n_real, n_fake)
    return {"density": float(inside.double().sum(0).mean() / k), "coverage": float(inside.any(1).double().mean())}


def kid(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> float:
    """Kernel inception distance (Binkowski et al. 2018, eq. 2 with the cubic kernel k(a, b) = (a.b / d + coef)^degree):
    the unbiased estimate of the squared MMD between two feature sets, whose expectation is 0 for two samples of one
    distribution at every sample size (Frechet distance's is not); the sets may differ in size."""
    x, y = _check_features(x, "x"), _check_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    m, n, d = len(x), len(y), x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + coef) ** degree for a, b in ((x, x), (y, y), (x, y)))
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))  # pairs i != j only: the unbiased part
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def nearest_neighbours(queries: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance from each query to its nearest reference row, and that row's index (both flattened to
    vectors: images are compared pixel by pixel). The copy check of lesson 3: generated samples much nearer the
    training set than held-out real data are would be memorised (Carlini et al. 2023; Somepalli et al. 2023)."""
    if not isinstance(queries, torch.Tensor) or not isinstance(reference, torch.Tensor):
        raise TypeError(f"queries and reference must be torch.Tensors, got {type(queries).__name__} and "
                        f"{type(reference).__name__}")
    if len(queries) == 0 or len(reference) == 0:
        raise ValueError("queries and reference must hold at least one row each")
    q, r = queries.reshape(len(queries), -1).double(), reference.reshape(len(reference), -1).double()
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries and reference must have the same size per row, got {q.shape[1]} and {r.shape[1]}")
    if not (torch.isfinite(q).all() and torch.isfinite(r).all()):
        raise ValueError("queries and reference must be finite (no NaN or inf)")
    dist, idx = torch.cdist(q, r, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)  # exact: a copy is at 0
    return dist, idx


def class_coverage(predicted: torch.Tensor, num_classes: int = 10, min_share: float = 0.5) -> int:
    """Number of classes that receive at least min_share of their fair share (1 / num_classes) of the samples."""
    predicted = torch.as_tensor(predicted).long().flatten()
    if predicted.numel() == 0 or predicted.min() < 0 or predicted.max() >= num_classes:
        raise ValueError(f"predicted must be non-empty class indices in [0, {num_classes - 1}]")
    share = torch.bincount(predicted, minlength=num_classes).double() / predicted.numel()
    return int((share >= min_share / num_classes).sum())


def high_frequency_energy(images: torch.Tensor, cutoff: float = 0.25) -> float:
    """Share of the images' spectral power (each image's mean removed) above `cutoff` cycles per pixel.

    A sharpness measure for lesson 4's "VAEs are blurry": blurring removes high frequencies, so a blurred set
    scores lower than the real data; white noise scores the share of frequency bins above the cutoff.
    """
    if not isinstance(images, torch.Tensor) or images.ndim < 3 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty tensor (N, ..., H, W), got {getattr(images, 'shape', images)!r}")
    if not 0 <= cutoff < 0.5 * 2 ** 0.5:
        raise ValueError(f"cutoff must be in [0, 0.707) cycles per pixel, got {cutoff!r}")
    x = images.detach().double().cpu()
    x = x - x.mean((-1, -2), keepdim=True)
    power = torch.fft.fft2(x).abs() ** 2
    fy, fx = torch.fft.fftfreq(x.shape[-2], dtype=torch.float64), torch.fft.fftfreq(x.shape[-1], dtype=torch.float64)
    high = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > cutoff
    total = power.sum()
    if total == 0:
        raise ValueError("the images are constant: their high-frequency share is undefined")
    return float(power[..., high].sum() / total)
