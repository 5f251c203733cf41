"""The denoising objective: eps / x0 / v / score parametrizations, the true posterior, SNR weighting, the simple loss.

All functions take alpha_bar_t already gathered and broadcastable against x_t (see NoiseSchedule.at).
"""
from __future__ import annotations

import torch

from .forward import q_sample
from .schedules import NoiseSchedule

PREDICTIONS = ("eps", "x0", "v", "score")
WEIGHTINGS = ("uniform", "min_snr")


def _check_prediction(kind: str) -> str:
    if kind not in PREDICTIONS:
        raise ValueError(f"prediction type must be one of {PREDICTIONS}, got {kind!r}")
    return kind


def v_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, sec. 4)."""
    return alpha_bar_t.sqrt() * eps - (1 - alpha_bar_t).sqrt() * x0


def to_eps(pred: torch.Tensor, kind: str, x_t: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Convert a model output of type `kind` into the noise eps it implies, given x_t = sqrt(ab) x0 + sqrt(1-ab) eps."""
    a, s = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
    if _check_prediction(kind) == "eps":
        return pred
    if kind == "x0":
        return (x_t - a * pred) / s
    if kind == "v":
        return s * x_t + a * pred
    return -s * pred  # score = grad log q(x_t) = -eps / sqrt(1 - ab) (Song et al. 2021, eq. 4 and sec. 3.3)


def from_eps(eps: torch.Tensor, kind: str, x_t: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Convert a noise eps into the quantity of type `kind` (eps, x0, v or score) it implies at x_t."""
    a, s = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
    if _check_prediction(kind) == "eps":
        return eps
    x0 = (x_t - s * eps) / a
    if kind == "x0":
        return x0
    if kind == "v":
        return v_target(x0, eps, alpha_bar_t)
    return -eps / s


def convert(pred: torch.Tensor, src: str, dst: str, x_t: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Convert a prediction between eps, x0, v and score parametrizations at the same x_t."""
    return from_eps(to_eps(pred, src, x_t, alpha_bar_t), dst, x_t, alpha_bar_t)


def posterior_coefficients(ab_t: torch.Tensor, ab_s: torch.Tensor):
    """q(x_s | x_t, x0) = N(c_x0 x0 + c_xt x_t, var) for s < t (Ho et al. 2020, eq. 7 with alpha_t -> ab_t / ab_s)."""
    beta = 1 - ab_t / ab_s
    return (ab_s.sqrt() * beta / (1 - ab_t), (1 - beta).sqrt() * (1 - ab_s) / (1 - ab_t),
            beta * (1 - ab_s) / (1 - ab_t))


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, t, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7); at t = 0 the variance is 0."""
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 and x_t must have the same shape, got {tuple(x0.shape)} and {tuple(x_t.shape)}")
    ab = schedule.alpha_bar  # coefficients in float64, then gathered: 1 - ab is tiny at t = 0
    coef_x0, coef_xt, var = posterior_coefficients(ab, torch.cat([ab.new_ones(1), ab[:-1]]))
    mean = schedule.at(coef_x0, t, x_t) * x0 + schedule.at(coef_xt, t, x_t) * x_t
    return mean, schedule.at(var, t, x_t)


def snr_weight(snr: torch.Tensor, prediction: str = "eps", kind: str = "uniform", gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weight: 'uniform' (1) or 'min_snr' (min(SNR, gamma) expressed for the prediction type; Hang et al. 2023, eq. 7)."""
    _check_prediction(prediction)
    if kind == "uniform":
        return torch.ones_like(snr)
    if kind not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {kind!r}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    clipped = snr.clamp(max=gamma)
    # the x0-space weight min(SNR, gamma) rewritten for each target's scale: an error in eps is sqrt(SNR) times the
    # x0 error, in v sqrt(SNR + 1) times, in the score sqrt(SNR (SNR + 1)) times (score = -eps / sqrt(1 - ab))
    return {"x0": clipped, "eps": clipped / snr, "v": clipped / (snr + 1),
            "score": clipped / (snr * (snr + 1))}[prediction]


def training_target(kind: str, x0: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor,
                    alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """What a model of prediction type `kind` is trained to output for (x0, eps)."""
    if kind == "x0":
        return x0  # exact, rather than recovered from x_t with rounding error
    return from_eps(eps, kind, x_t, alpha_bar_t)


def diffusion_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, prediction: str = "eps",
                   weighting: str = "uniform", gamma: float = 5.0, generator: torch.Generator | None = None,
                   rows: slice | None = None, **model_kwargs) -> torch.Tensor:
    """The simple loss E_{t, eps} w(t) ||target - model(x_t, t)||^2 with t uniform (Ho et al. 2020, eq. 14).

    `rows`: draw t and the noise for the whole batch, then compute the loss on these rows only (a data-parallel
    rank's share; course_lib.distributed), so that the ranks together see exactly one process's batch."""
    _check_prediction(prediction)
    b = x0.shape[0]
    t = torch.randint(schedule.T, (b,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    if rows is not None:
        x0, t, eps = x0[rows], t[rows], eps[rows]
        model_kwargs = {k: v[rows] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == b else v
                        for k, v in model_kwargs.items()}
    x_t = q_sample(x0, t, schedule, noise=eps)
    ab_t = schedule.at(schedule.alpha_bar, t, x0)
    target = training_target(prediction, x0, eps, x_t, ab_t)
    out = model(x_t, t, **model_kwargs)
    if out.shape != target.shape:
        raise ValueError(f"model output shape {tuple(out.shape)} differs from the data's {tuple(target.shape)}")
    per_sample = ((out - target) ** 2).flatten(1).mean(1)
    w = snr_weight((ab_t / (1 - ab_t)).flatten(), prediction, weighting, gamma)
    return (w * per_sample).mean()


def gaussian_kl(mean1, var1, mean2, var2) -> torch.Tensor:
    """Elementwise KL( N(mean1, var1) || N(mean2, var2) ) in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, var, levels: int) -> torch.Tensor:
    """log P(x) per element for data on `levels` evenly spaced values in [-1, 1] (Ho et al. 2020, eq. 13)."""
    half = 1.0 / (levels - 1)  # half a bin
    std = torch.as_tensor(var, dtype=x.dtype, device=x.device).sqrt()
    normal = torch.distributions.Normal(mean, std)
    upper = torch.where(x > 1 - half, torch.ones_like(x), normal.cdf(x + half))
    lower = torch.where(x < -1 + half, torch.zeros_like(x), normal.cdf(x - half))
    return torch.log((upper - lower).clamp(min=1e-12))


def _x0_hat(model, x_t, t, schedule, prediction, clip=None, **model_kwargs):
    ab_t = schedule.at(schedule.alpha_bar, t, x_t)
    out = model(x_t.to(torch.get_default_dtype()), t, **model_kwargs).to(x_t.dtype)
    x0 = convert(out, prediction, "x0", x_t, ab_t)
    return x0 if clip is None else x0.clamp(-clip, clip)


def _check_clip(clip):
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ValueError(f"clip must be None or a positive number (the data range), got {clip!r}")
    return clip


def _check_bound_args(model, prediction, variance):
    prediction = prediction or getattr(model, "prediction", None)
    _check_prediction(prediction or "")
    if prediction == "score":
        raise ValueError("the variational bound needs an eps, x0 or v model")
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
    return prediction


@torch.no_grad()
def vlb_term(model, x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, prediction: str | None = None,
             variance: str = "beta", generator: torch.Generator | None = None, clip: float | None = None,
             **model_kwargs) -> torch.Tensor:
    """The ELBO's KL term at array index t >= 1, per sample, summed over dimensions, in nats (Ho et al. 2020, eq. 5).

    In the papers' numbering (steps 1..T, lesson 0) index t is step t + 1, so this is
    L_t = KL(q(x_t | x_{t+1}, x_0) || p(x_t | x_{t+1})); index 0 is the decoder's step (`variational_bound`).
    `clip` clamps the model's x0 estimate to [-clip, clip], as the samplers do for data in that range."""
    prediction = _check_bound_args(model, prediction, variance)
    _check_clip(clip)
    x0 = x0.double() if x0.device.type == "cpu" else x0
    x_t = q_sample(x0, t, schedule, generator=generator)
    mean_q, var_q = q_posterior(x0, x_t, t, schedule)
    mean_p, _ = q_posterior(_x0_hat(model, x_t, t, schedule, prediction, clip, **model_kwargs), x_t, t, schedule)
    var_p = schedule.at(schedule.betas, t, x_t) if variance == "beta" else var_q
    return gaussian_kl(mean_q, var_q, mean_p, var_p).flatten(1).sum(1)


@torch.no_grad()
def variational_bound(model, x0: torch.Tensor, schedule: NoiseSchedule, prediction: str | None = None,
                      variance: str = "beta", levels: int | None = None, n_t: int | None = None,
                      generator: torch.Generator | None = None, clip: float | None = None, **model_kwargs) -> dict:
    """Per-sample negative ELBO, L_prior + sum_t L_t + L_0 (Ho et al. 2020, eq. 5), in nats.

    Reverse variances are fixed: 'beta' (beta_t) or 'posterior' (beta-tilde_t). With `levels` the data is
    discrete (e.g. 17 grey levels for the digits) and the decoder is the discretized Gaussian; otherwise
    it is a Gaussian density. `n_t=None` sums every t exactly; an int estimates the sum from n_t uniformly
    drawn timesteps per sample (unbiased). Returns tensors of shape (B,): prior, diffusion, decoder, total,
    and bits_per_dim = total / (D ln 2).

    `clip` bounds the reverse model whose x0 estimate is clamped to [-clip, clip] (the model the samplers run on
    data in that range). Any reverse model gives a valid bound; for data inside the range clamping moves every
    estimate closer to the truth, so each term can only fall. It matters at the cosine schedule's last step, where
    an eps-model's x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) divides a tiny eps error by sqrt(ab) ~ 5e-5.
    """
    prediction = _check_bound_args(model, prediction, variance)
    _check_clip(clip)
    if levels is not None and (x0.min() < -1 or x0.max() > 1):
        raise ValueError("discrete data (levels given) must lie in [-1, 1]")
    b, dims, T = x0.shape[0], x0[0].numel(), schedule.T
    x0 = x0.double() if x0.device.type == "cpu" else x0

    def kl_term(t):
        return vlb_term(model, x0, t, schedule, prediction, variance, generator, clip, **model_kwargs)

    last = torch.full((b,), T - 1, device=x0.device)
    ab_last = schedule.at(schedule.alpha_bar, last, x0)
    prior = gaussian_kl(ab_last.sqrt() * x0, 1 - ab_last, torch.zeros_like(x0), torch.ones_like(x0)).flatten(1).sum(1)
    if n_t is None:
        diffusion = sum(kl_term(torch.full((b,), t, device=x0.device)) for t in range(1, T))
    else:
        if not isinstance(n_t, int) or n_t < 1:
            raise ValueError(f"n_t must be a positive int or None, got {n_t!r}")
        draws = [kl_term(torch.randint(1, T, (b,), generator=generator).to(x0.device)) for _ in range(n_t)]
        diffusion = (T - 1) * torch.stack(draws).mean(0)
    zero = torch.zeros((b,), dtype=torch.long, device=x0.device)
    x_0 = q_sample(x0, zero, schedule, generator=generator)
    mean, var = _x0_hat(model, x_0, zero, schedule, prediction, clip, **model_kwargs), schedule.at(schedule.betas, zero, x0)
    if levels is None:
        log_p = -0.5 * (torch.log(2 * torch.pi * var) + (x0 - mean) ** 2 / var)
    else:
        log_p = discretized_gaussian_log_likelihood(x0, mean, var, levels)
    decoder = -log_p.flatten(1).sum(1)
    total = prior + diffusion + decoder
    return dict(prior=prior, diffusion=diffusion, decoder=decoder, total=total,
                bits_per_dim=total / (dims * torch.log(torch.tensor(2.0, dtype=total.dtype))))
