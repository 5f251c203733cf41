"""Exact models for data whose distribution is known: they plug into samplers and bounds like a trained network."""
from __future__ import annotations

import torch

from .schedules import NoiseSchedule


def _interp(t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values at fractional indices t, linearly interpolated."""
    lo = t.floor().long().clamp(0, len(values) - 2)
    return values[lo] + (t - lo) * (values[lo + 1] - values[lo])


def gaussian_eps_model(schedule: NoiseSchedule, std: float):
    """The exact eps-predictor for data ~ N(0, std^2 I): E[eps | x_t] = sqrt(1-ab) x_t / (ab std^2 + 1 - ab)."""
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std!r}")

    def model(x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if t.is_floating_point():  # between grid points: log-sigma interpolated, the inverse of samplers.sigma_to_t
            log_sigma = _interp(t.double().cpu(), schedule.sigmas.log())
            ab = torch.sigmoid(-2 * log_sigma).to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        else:
            ab = schedule.at(schedule.alpha_bar, t, x).to(x.dtype)
        return (1 - ab).sqrt() * x / (ab * std**2 + 1 - ab)

    model.prediction = "eps"
    return model


def gaussian_denoiser(std: float, mean: float = 0.0):
    """The exact D(x, sigma) = mean + std^2 / (std^2 + sigma^2) (x - mean) for data ~ N(mean, std^2 I)."""
    from .samplers import Denoiser

    if not std > 0:
        raise ValueError(f"std must be > 0, got {std!r}")
    return Denoiser(lambda x, sigma: mean + std**2 / (std**2 + sigma**2) * (x - mean))


def multivariate_gaussian_denoiser(mean: torch.Tensor, cov: torch.Tensor):
    """The exact D(x, sigma) = mean + cov (cov + sigma^2 I)^-1 (x - mean) for data ~ N(mean, cov), on rows of x."""
    from .samplers import Denoiser

    mean, cov = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
    if mean.ndim != 1 or cov.shape != (len(mean), len(mean)):
        raise ValueError(f"mean must be (d,) and cov (d, d), got {tuple(mean.shape)} and {tuple(cov.shape)}")
    eye = torch.eye(len(mean), dtype=torch.float64)
    return Denoiser(lambda x, sigma: (mean + (x.double() - mean) @ torch.linalg.solve(cov + sigma**2 * eye, cov))
                    .to(x.dtype))


def correlated_pairs_gaussian(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, covariance, known mask) of a 4- or 6-dimensional Gaussian made of 2-3 correlated pairs (one coordinate
    known, one unknown; correlation 0.95-0.99, scales 0.5-2), each half turned by a random rotation and the coordinates
    shuffled: the conditional of the unknown half is narrow (its variance 1 - rho^2 of the marginal's, 2-10%), the
    case where replacement without resampling visibly fails."""
    pairs = int(torch.randint(2, 4, (1,), generator=gen))
    rho = 0.95 + 0.04 * torch.rand(pairs, generator=gen, dtype=torch.float64)
    scale = 0.5 + 1.5 * torch.rand(pairs, generator=gen, dtype=torch.float64)
    rot_k, _ = torch.linalg.qr(torch.randn(pairs, pairs, generator=gen, dtype=torch.float64))
    rot_u, _ = torch.linalg.qr(torch.randn(pairs, pairs, generator=gen, dtype=torch.float64))
    s = torch.diag(scale**2)
    blocks = [[rot_k @ s @ rot_k.T, rot_k @ (s * rho) @ rot_u.T], [None, rot_u @ s @ rot_u.T]]
    blocks[1][0] = blocks[0][1].T
    cov = torch.cat([torch.cat(row, 1) for row in blocks], 0)
    perm = torch.randperm(2 * pairs, generator=gen)
    cov = cov[perm][:, perm]
    known = perm < pairs
    return torch.randn(2 * pairs, generator=gen, dtype=torch.float64), cov, known


def gaussian_conditional(mean: torch.Tensor, cov: torch.Tensor, known: torch.Tensor, x_known: torch.Tensor):
    """(the conditional means, one per row of x_known, and the conditional covariance) of the coordinates of
    N(mean, cov) where `known` is False, given those where it is True (the Schur complement)."""
    k, u = known, ~known
    coef = torch.linalg.solve(cov[k][:, k], cov[k][:, u]).T
    return mean[u] + (x_known.double() - mean[k]) @ coef.T, cov[u][:, u] - coef @ cov[k][:, u]


def gaussian_ode_solution(x: torch.Tensor, sigma_from: float, sigma_to: float, std: float, mean: float = 0.0):
    """Closed-form probability-flow ODE flow for N(mean, std^2): x - mean scales by sqrt((std^2 + s^2) / (std^2 + s0^2))."""
    return mean + (x - mean) * ((std**2 + sigma_to**2) / (std**2 + sigma_from**2)) ** 0.5


def mixture_denoiser(mixture):
    """The exact D(x, sigma) for an equal-weight isotropic Gaussian mixture: each mode's Gaussian denoiser,
    weighted by the posterior probability of that mode given x (the responsibilities under N(mu_k, (s^2 + sigma^2) I))."""
    from .samplers import Denoiser

    modes, s2 = mixture.modes.double(), float(mixture.std) ** 2
    logits = mixture_class_logits(mixture)

    def fn(x, sigma):
        m = modes.to(x.device, x.dtype)
        r = torch.softmax(logits(x, sigma), dim=1)  # (B, K): p(mode | x), Bayes with equal weights
        shrink = s2 / (s2 + sigma**2)
        return (r[..., None] * (m[None] + shrink * (x[:, None, :] - m[None]))).sum(1)

    radius = float(modes.norm(dim=1).max()) + 3 * s2**0.5
    return Denoiser(fn, sigma_min=0.002, sigma_max=max(80.0, 10 * radius))


def mixture_conditional_denoiser(mixture):
    """The exact class-conditional D(x, sigma, y) of an equal-weight Gaussian mixture whose label is the mode:
    mode y's Gaussian denoiser mu_y + s^2 / (s^2 + sigma^2) (x - mu_y); y = K (the number of modes) is 'no label'
    and gives the unconditional mixture_denoiser, as a network trained with label dropout does."""
    from .samplers import Denoiser

    modes, s2 = mixture.modes.double(), float(mixture.std) ** 2
    k = len(modes)
    uncond = mixture_denoiser(mixture)

    def fn(x, sigma, y=None):
        if y is None:
            raise ValueError(f"pass y= (labels 0..{k - 1}, or {k} for 'no label')")
        y = torch.as_tensor(y, device=x.device).long().expand(x.shape[0])
        if (y < 0).any() or (y > k).any():
            raise ValueError(f"labels must be in 0..{k} ({k} = no label), got {y.min().item()} to {y.max().item()}")
        mu = modes.to(x.device, x.dtype)[y.clamp(max=k - 1)]
        out = mu + s2 / (s2 + sigma**2) * (x - mu)
        none = y == k
        if none.any():
            out = torch.where(none[:, None], uncond.fn(x, sigma), out)
        return out

    den = Denoiser(fn, uncond.sigma_min, uncond.sigma_max)
    den.config = {"num_classes": k}  # the 'no label' index, where course_lib.guidance looks for it on a network
    return den


def mixture_class_logits(mixture):
    """The exact classifier of noisy mixture data: log p(y | x, sigma) up to a constant, i.e. -|x - mu_y|^2 / (2 (s^2 +
    sigma^2)) (each mode equally likely; x = x0 + sigma eps is N(mu_y, (s^2 + sigma^2) I) given y)."""
    modes, s2 = mixture.modes.double(), float(mixture.std) ** 2

    def logits(x, sigma):
        m = modes.to(x.device, x.dtype)
        return -((x[:, None, :] - m[None]) ** 2).sum(-1) / (2 * (s2 + sigma**2))

    return logits


def tilted_mixture_samples(mixture, w: float, labels: torch.Tensor, generator: torch.Generator | None = None,
                           grid: int = 241, width: float = 6.0) -> torch.Tensor:
    """Exact samples of the 'sharpened' target p(x | y)^w p(x)^(1 - w), renormalised, that classifier-free guidance
    is often said to sample (Ho & Salimans 2022, sec. 3.2), for a mixture whose label is the mode: drawn from its
    density on a grid x grid lattice over mode y +- width std, jittered uniformly within a cell. (B,) labels ->
    (B, 2) points."""
    s = mixture.std
    modes = mixture.modes.double()
    labels = torch.as_tensor(labels).long()
    if labels.ndim != 1 or (labels < 0).any() or (labels >= len(modes)).any():
        raise ValueError(f"labels must be a 1D tensor of modes 0..{len(modes) - 1}")
    g = torch.linspace(-width * s, width * s, grid, dtype=torch.float64)
    lattice = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    out = torch.empty(len(labels), 2, dtype=torch.float64)
    for c in labels.unique().tolist():
        pts = lattice + modes[c]
        log_all = -((pts[:, None] - modes[None]) ** 2).sum(-1) / (2 * s * s)
        log_d = w * log_all[:, c] + (1 - w) * torch.logsumexp(log_all, 1)
        idx = (labels == c).nonzero()[:, 0]
        pick = torch.multinomial(torch.softmax(log_d, 0).float(), len(idx), replacement=True, generator=generator)
        out[idx] = pts[pick] + (torch.rand(len(idx), 2, generator=generator, dtype=torch.float64) - 0.5) * (g[1] - g[0])
    return out.float()
