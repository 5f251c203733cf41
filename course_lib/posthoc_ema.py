"""EDM2's power-function EMA and its post-hoc reconstruction (Karras et al. 2024, sec. 3.1-3.2 and app. C).

A power-function average at training step t weighs the weights of step tau in proportion to tau^gamma (tau <= t):
the profile p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]. Its width relative to t is sigma_rel (eq. 3).
Keep two such averages, save them now and then, and any other average can be rebuilt afterwards as the least-squares
combination of the saved ones (app. C.2, eq. 20-23): the length of the EMA becomes a choice made after training.
"""
from __future__ import annotations

import copy
import math

import torch


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > -1 or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number > -1, got {gamma!r}")
    return float(gamma)


def sigma_rel_of_gamma(gamma: float) -> float:
    """The relative standard deviation of a power profile of exponent gamma: sqrt(g+1) / ((g+2) sqrt(g+3)) (eq. 3)."""
    g = _check_gamma(gamma)
    return math.sqrt(g + 1) / ((g + 2) * math.sqrt(g + 3))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent whose profile has this relative std (inverts sigma_rel_of_gamma: the largest root of
    s^2 (g+2)^2 (g+3) = g+1; EDM2's std_to_exp). sigma_rel must lie in (0, 1/sqrt(12)), the std of a flat profile
    (gamma = 0) being 1/sqrt(12)."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel < 12 ** -0.5:
        raise ValueError(f"sigma_rel must be a number in (0, {12 ** -0.5:.4f}), got {sigma_rel!r}")
    s2 = float(sigma_rel) ** 2
    lo, hi = 0.0, 1.0
    while sigma_rel_of_gamma(hi) > sigma_rel:  # sigma_rel falls monotonically with gamma for gamma >= 0
        hi *= 2
    for _ in range(200):  # bisection: exact to float precision, and no polynomial roots to pick among
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if s2 * (mid + 2) ** 2 * (mid + 3) > mid + 1 else (mid, hi)
    return (lo + hi) / 2


def power_beta(step: int, gamma: float) -> float:
    """The EMA decay after update number `step` (1, 2, ...) that keeps a power-function average: (1 - 1/step)^(gamma+1)."""
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be a positive int, got {step!r}")
    return (1 - 1 / step) ** (_check_gamma(gamma) + 1)


def profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """<p_a, p_b> = integral over tau of two normalised power profiles (EDM2 app. C.2, eq. 23):
    (g_a+1)(g_b+1) min(t_a, t_b)^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1))."""
    ga, gb = _check_gamma(gamma_a), _check_gamma(gamma_b)
    if not (t_a > 0 and t_b > 0):
        raise ValueError(f"snapshot times must be > 0, got {t_a} and {t_b}")
    t_min = min(t_a, t_b)
    log = (math.log(ga + 1) + math.log(gb + 1) + (ga + gb + 1) * math.log(t_min) - math.log(ga + gb + 1)
           - (ga + 1) * math.log(t_a) - (gb + 1) * math.log(t_b))
    return math.exp(log)


def posthoc_weights(times, gammas, target_time: float, target_gamma: float) -> torch.Tensor:
    """The coefficients x of saved averages (times[i], gammas[i]) whose combination sum_i x_i p_i is closest in L2 to
    the target profile: the solution of A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p_target> (EDM2 eq. 22)."""
    times, gammas = list(times), list(gammas)
    if len(times) != len(gammas) or not times:
        raise ValueError(f"need one gamma per snapshot time, got {len(times)} times and {len(gammas)} gammas")
    n = len(times)
    a = torch.tensor([[profile_inner(times[i], gammas[i], times[j], gammas[j]) for j in range(n)] for i in range(n)],
                     dtype=torch.float64)
    b = torch.tensor([profile_inner(times[i], gammas[i], target_time, target_gamma) for i in range(n)],
                     dtype=torch.float64)
    return torch.linalg.lstsq(a, b[:, None]).solution.flatten()


def profile_error(times, gammas, weights, target_time: float, target_gamma: float) -> float:
    """||sum_i w_i p_i - p_target|| relative to ||p_target|| (0: the target rebuilt exactly), from the inner products."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    pairs = list(zip(times, gammas))
    if len(w) != len(pairs):
        raise ValueError(f"need one weight per snapshot ({len(pairs)}), got {len(w)}")
    a = torch.tensor([[profile_inner(*p, *q) for q in pairs] for p in pairs], dtype=torch.float64)
    b = torch.tensor([profile_inner(*p, target_time, target_gamma) for p in pairs], dtype=torch.float64)
    tt = profile_inner(target_time, target_gamma, target_time, target_gamma)
    return math.sqrt(max(float(w @ a @ w - 2 * w @ b + tt), 0.0) / tt)


class PowerEMA:
    """Power-function averages of a model's weights for several exponents, updated after each optimizer step; use it
    as a Trainer callback (every=1). `snapshot()` copies the averages with the step they belong to."""

    def __init__(self, model: torch.nn.Module, gammas=(16.97, 6.94)):  # sigma_rel 0.05 and 0.10 (EDM2's pair)
        self.gammas = tuple(_check_gamma(g) for g in gammas)
        self.averages = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.gammas]
        self.step, self.snapshots = 0, []

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.step += 1
        for gamma, avg in zip(self.gammas, self.averages):
            beta = power_beta(self.step, gamma)
            for a, p in zip(avg.parameters(), model.parameters()):
                a.lerp_(p.detach(), 1 - beta)
            for a, p in zip(avg.buffers(), model.buffers()):
                a.copy_(p)

    def __call__(self, trainer) -> None:  # as Trainer.train(callback=ema, every=1)
        self.update(trainer.model)

    def snapshot(self) -> None:
        """Save every average now (its state dict, the step, its gamma)."""
        for gamma, avg in zip(self.gammas, self.averages):
            self.snapshots.append({"step": self.step, "gamma": gamma,
                                   "state": {k: v.detach().clone() for k, v in avg.state_dict().items()}})

    def reconstruct(self, sigma_rel: float, step: int | None = None) -> dict:
        """The state dict of the power EMA of relative width sigma_rel at `step` (default the last snapshot's),
        rebuilt post hoc from the snapshots saved up to then."""
        if not self.snapshots:
            raise ValueError("no snapshots yet: call snapshot() during training")
        step = step or self.snapshots[-1]["step"]
        used = [s for s in self.snapshots if s["step"] <= step]
        w = posthoc_weights([s["step"] for s in used], [s["gamma"] for s in used], step, gamma_of_sigma_rel(sigma_rel))
        return combine([s["state"] for s in used], w)


def combine(states: list[dict], weights) -> dict:
    """sum_i weights[i] * states[i], key by key (state dicts of one architecture)."""
    weights = torch.as_tensor(weights, dtype=torch.float64).flatten().tolist()
    if len(weights) != len(states) or not states:
        raise ValueError(f"need one weight per state dict, got {len(weights)} weights for {len(states)}")
    out = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            out[key] = sum(w * s[key].double() for w, s in zip(weights, states)).to(ref.dtype)
        else:
            out[key] = ref.clone()
    return out
