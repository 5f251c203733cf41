"""Discrete diffusion for tokens: D3PM's transition matrices (Austin et al. 2021, sec. 3 and app. A), the closed form
q(x_t | x_0), and masked (absorbing-state) diffusion in continuous time with the MDLM objective (Sahoo et al. 2024,
eq. 10): a masked-language-model loss weighted by -alpha'(t) / (1 - alpha(t)).

Tokens are integer ids in [0, K); the absorbing state is one of them (`mask_id`). Probabilities act on rows:
q(x_t | x_{t-1}) = x_{t-1} Q_t, with x a one-hot row vector, so every Q_t is row-stochastic.
"""
from __future__ import annotations

import math

import torch


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"the vocabulary size must be an int >= 2, got {k!r}")
    return k


def _check_beta(beta) -> float:
    beta = float(beta)
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return beta


def uniform_transition(k: int, beta: float) -> torch.Tensor:
    """Q = (1 - beta) I + beta / K 1 1^T: keep the token, or resample it uniformly (Austin et al. 2021, eq. 4 / app. A.2)."""
    k, beta = _check_k(k), _check_beta(beta)
    return (1 - beta) * torch.eye(k, dtype=torch.float64) + beta / k * torch.ones(k, k, dtype=torch.float64)


def absorbing_transition(k: int, beta: float, mask_id: int) -> torch.Tensor:
    """Q = (1 - beta) I + beta 1 e_mask^T: each token turns into [MASK] with probability beta, and [MASK] stays
    (Austin et al. 2021, app. A.2.2)."""
    k, beta = _check_k(k), _check_beta(beta)
    if not isinstance(mask_id, int) or not 0 <= mask_id < k:
        raise ValueError(f"mask_id must be an int in [0, {k}), got {mask_id!r}")
    q = (1 - beta) * torch.eye(k, dtype=torch.float64)
    q[:, mask_id] += beta
    return q


def cumulative(transitions) -> torch.Tensor:
    """Q-bar_t = Q_1 Q_2 ... Q_t, so that q(x_t | x_0) = x_0 Q-bar_t (a matrix per step, multiplied in order)."""
    mats = list(transitions)
    if not mats:
        raise ValueError("need at least one transition matrix")
    out = mats[0]
    for q in mats[1:]:
        out = out @ q
    return out


def uniform_marginal(k: int, alpha_bar: float) -> torch.Tensor:
    """The closed form of the uniform chain: Q-bar = alpha-bar I + (1 - alpha-bar) / K 1 1^T, alpha-bar = prod(1 - beta)."""
    return uniform_transition(k, 1 - float(alpha_bar))


def absorbing_marginal(k: int, alpha_bar: float, mask_id: int) -> torch.Tensor:
    """The closed form of the absorbing chain: a token survives to t with probability alpha-bar = prod(1 - beta), and is
    [MASK] otherwise."""
    return absorbing_transition(k, 1 - float(alpha_bar), mask_id)


# ---- masked diffusion in continuous time (MDLM) ----------------------------------------------------------------------

SCHEDULES = ("linear", "cosine")


def alpha(t, schedule: str = "linear") -> torch.Tensor:
    """The share of tokens still unmasked at time t in [0, 1]: 1 - t (linear) or cos(pi t / 2) (cosine)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if schedule == "linear":
        return 1 - t
    if schedule == "cosine":
        return torch.cos(0.5 * math.pi * t)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def alpha_rate(t, schedule: str = "linear") -> torch.Tensor:
    """d alpha / dt."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if schedule == "linear":
        return -torch.ones_like(t)
    if schedule == "cosine":
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def mask_tokens(x0: torch.Tensor, t, mask_id: int, schedule: str = "linear", generator: torch.Generator | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
    """A draw of q(x_t | x_0): every token independently replaced by mask_id with probability 1 - alpha(t); t is a
    number or one value per row (B,). `keep` (bool, like x0) marks positions never masked (padding, a prompt)."""
    if x0.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"x0 must hold integer token ids, got {x0.dtype}")
    t = torch.as_tensor(t, dtype=torch.float64)
    t = t.reshape(-1, *([1] * (x0.ndim - 1))) if t.ndim == 1 else t
    if ((t < 0) | (t > 1)).any():
        raise ValueError("t must lie in [0, 1]")
    masked = torch.rand(x0.shape, generator=generator, dtype=torch.float64) < (1 - alpha(t, schedule))
    if keep is not None:
        masked &= ~keep
    return torch.where(masked.to(x0.device), torch.full_like(x0, mask_id), x0)


def mdlm_weight(t, schedule: str = "linear") -> torch.Tensor:
    """The weight of the masked tokens' cross-entropy at time t: -alpha'(t) / (1 - alpha(t)) (1 / t for linear)."""
    return -alpha_rate(t, schedule) / (1 - alpha(t, schedule))


def mdlm_loss(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t, mask_id: int,
              schedule: str = "linear") -> torch.Tensor:
    """The continuous-time negative ELBO of masked diffusion per sequence, in nats (Sahoo et al. 2024, eq. 10):
    weight(t) times the cross-entropy of x0 under the model at every masked position of x_t. logits (B, L, K) ->
    (B,). Averaged over t ~ U(0, 1) it bounds -log p(x0); unmasked positions cost nothing (their token is copied)."""
    if logits.shape[:-1] != x0.shape or xt.shape != x0.shape:
        raise ValueError(f"logits (B, L, K) must match x0 and x_t (B, L): got {tuple(logits.shape)}, "
                         f"{tuple(x0.shape)}, {tuple(xt.shape)}")
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")  # (B, L)
    masked = (xt == mask_id) & (x0 != mask_id)
    w = mdlm_weight(torch.as_tensor(t, dtype=torch.float64), schedule).to(logits.device, logits.dtype)
    w = w.reshape(-1, 1) if w.ndim == 1 else w
    return (w * ce * masked).sum(1)


def subs_log_probs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Log-probabilities over tokens with [MASK] given probability zero (MDLM's SUBS parameterisation, Sahoo et al.
    2024, sec. 3.2): a model of clean text never predicts the absorbing state."""
    if not 0 <= mask_id < logits.shape[-1]:
        raise ValueError(f"mask_id {mask_id} is not a token of these logits (size {logits.shape[-1]})")
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def corpus_denoiser(corpus: torch.Tensor, vocab_size: int, mask_id: int, mismatch_cost: float = 20.0):
    """The exact denoiser of masked diffusion when the data are the rows of `corpus` (each row as often as it occurs):
    x_t -> p(x0_i = k | x_t), (n, L, K), the share of corpus rows that agree with x_t's visible tokens and hold k at
    i (visible positions get their own token). What the network approximates; the analogue of
    analytic.mixture_denoiser for tokens. A row of x_t that no corpus row agrees with (parallel decoding can make
    one) is given the rows that disagree least: each row is weighted by exp(-mismatch_cost x its disagreements), which
    changes an answer with any agreeing row by less than M e^-mismatch_cost."""
    if not isinstance(corpus, torch.Tensor) or corpus.ndim != 2 or corpus.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"corpus must be integer token ids of shape (M, L), got {getattr(corpus, 'shape', corpus)}")
    _check_k(vocab_size)
    rows, counts = torch.unique(corpus.long(), dim=0, return_counts=True)
    onehot = torch.nn.functional.one_hot(rows, vocab_size).double().flatten(1)  # (M, L K)
    log_counts = counts.double().log()

    def denoise(xt: torch.Tensor) -> torch.Tensor:
        if not isinstance(xt, torch.Tensor) or xt.ndim != 2 or xt.shape[1] != rows.shape[1]:
            raise ValueError(f"x_t must have shape (n, {rows.shape[1]}), got {getattr(xt, 'shape', xt)}")
        visible = (xt != mask_id)[:, None]
        mismatches = ((rows[None] != xt[:, None]) & visible).sum(-1)                  # (n, M)
        w = torch.softmax(log_counts - mismatch_cost * mismatches.double(), dim=1)
        return (w @ onehot).reshape(len(xt), rows.shape[1], vocab_size)

    return denoise
