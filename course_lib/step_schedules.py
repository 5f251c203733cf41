"""Which noise levels a sampler visits: the spacings (uniform, leading, trailing, Karras) and, per model and
budget, a Karras schedule tuned on noise seeds kept apart from any evaluation.

A few-step sampler is only as good as its noise levels. `get_sigmas` builds the standard spacings from a model's
schedule; `tune_karras` chooses the three numbers of a Karras spacing (sigma_min, sigma_max, rho) for one sampler and
one budget by maximising a quality score of the samples on tuning noise: a coarse grid, then Powell's method. The
shipped checkpoints carry the result in their card (`sampling`), `load_pretrained` attaches it to the model, and
`samplers.sample` uses it by default (`default_sigmas`).
"""
from __future__ import annotations

import math

import torch

from .schedules import NoiseSchedule


def check_timesteps(timesteps, schedule: NoiseSchedule) -> list[int]:
    """A strictly decreasing list of integer timesteps in [0, T-1], or a clear error."""
    if timesteps is None:
        return list(range(schedule.T - 1, -1, -1))
    ts = [int(t) for t in torch.as_tensor(timesteps).flatten().tolist()]
    if not ts:
        raise ValueError("timesteps must not be empty")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing (noisiest first), got {ts[:8]}...")
    if ts[0] >= schedule.T or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {schedule.T - 1}], got {ts[0]} ... {ts[-1]}")
    return ts


def check_sigmas(sigmas) -> torch.Tensor:
    """A 1-D float64 tensor of at least 2 finite, strictly decreasing noise levels; only the last may be 0."""
    if isinstance(sigmas, (str, bytes)) or sigmas is None:
        raise TypeError(f"sigmas must be a list or 1-D tensor of floats, got {type(sigmas).__name__}")
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if s.numel() < 2:
        raise ValueError(f"sigmas needs at least 2 noise levels (a start and an end), got {s.numel()}")
    if not torch.isfinite(s).all():
        raise ValueError("sigmas must be finite")
    if (s[:-1] <= s[1:]).any():
        raise ValueError(f"sigmas must be strictly decreasing (noisiest first), got {[round(v, 4) for v in s[:6].tolist()]}...")
    if s[-1] < 0:
        raise ValueError(f"sigmas must be >= 0, got {s[-1].item()}")
    return s


def _check_steps(n, most: int | None = None) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (most is not None and n > most):
        raise ValueError(f"the number of steps must be an int in [1, {most or 'inf'}], got {n!r}")
    return n


def uniform_timesteps(schedule: NoiseSchedule, n: int) -> list[int]:
    """n timesteps evenly spaced from T-1 down to 0, diffusers' 'linspace' (Nichol & Dhariwal 2021, sec. 4)."""
    n = _check_steps(n, schedule.T)
    return sorted({round(i * (schedule.T - 1) / max(n - 1, 1)) for i in range(n)}, reverse=True)


def leading_timesteps(schedule: NoiseSchedule, n: int) -> list[int]:
    """diffusers' 'leading' spacing: 0, T//n, 2T//n, ... reversed; never visits the last (noisiest) timestep."""
    n = _check_steps(n, schedule.T)
    return [i * (schedule.T // n) for i in range(n)][::-1]


def trailing_timesteps(schedule: NoiseSchedule, n: int) -> list[int]:
    """diffusers' 'trailing' spacing: T-1, T-1-T/n, ... (Lin et al. 2024, 'Common diffusion noise schedules are flawed', sec. 3.3)."""
    n = _check_steps(n, schedule.T)
    return [round(schedule.T - i * schedule.T / n) - 1 for i in range(n)]


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n noise levels from sigma_max to sigma_min, evenly spaced in sigma^(1/rho), then 0 (Karras et al. 2022, eq. 5)."""
    n = _check_steps(n)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def sigmas_from_timesteps(schedule: NoiseSchedule, timesteps) -> torch.Tensor:
    """The noise levels sigma_t = sqrt((1 - ab_t) / ab_t) of the given timesteps, then 0."""
    ts = check_timesteps(timesteps, schedule)
    return torch.cat([schedule.sigmas[ts], torch.zeros(1, dtype=torch.float64)])


def time_sigmas(n: int, t_max: float = 1 - 1e-5) -> torch.Tensor:
    """n + 1 noise levels for n steps uniform in t from t_max to 0 (how flow models are usually sampled), as sigmas."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not 0 < t_max < 1:
        raise ValueError(f"t_max must be in (0, 1), got {t_max}")
    t = torch.linspace(t_max, 0, n + 1, dtype=torch.float64)
    return t / (1 - t)


SPACINGS = ("uniform", "leading", "trailing", "karras")


def get_sigmas(n: int, spacing: str = "uniform", schedule: NoiseSchedule | None = None,
               sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0) -> torch.Tensor:
    """n + 1 decreasing noise levels (the last 0) for n steps: 'uniform' / 'leading' / 'trailing' in t, or 'karras'."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS} (or 'auto' in samplers.sample), got {spacing!r}")
    if spacing == "karras":
        if schedule is not None:
            sigma_min = float(schedule.sigmas[0]) if sigma_min is None else sigma_min
            sigma_max = float(schedule.sigmas[-1]) if sigma_max is None else sigma_max
        if sigma_min is None or sigma_max is None:
            raise ValueError("karras spacing needs a schedule or both sigma_min and sigma_max")
        return karras_sigmas(n, sigma_min, sigma_max, rho)
    if schedule is None:
        raise ValueError(f"{spacing!r} spacing picks timesteps, so it needs the model's NoiseSchedule")
    pick = {"uniform": uniform_timesteps, "leading": leading_timesteps, "trailing": trailing_timesteps}[spacing]
    return sigmas_from_timesteps(schedule, pick(schedule, n))




# ---------------------------------------------------------------------------------------------------------------
# A Karras schedule tuned per model, sampler and budget

TUNE_SEED = 2026  # the noise of every tuning run; benchmarks and lessons evaluate on other seeds
SIGMA_MAX_GRID = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 80.0)
SIGMA_MIN_GRID = (0.002, 0.005, 0.02, 0.05, 0.1)
RHO_GRID = (2.0, 4.0, 7.0)
# with three steps or fewer the lowest interior level can belong far higher: lesson 9's reflowed flow has its tuned
# two-step middle level at sigma 16 (t = 0.94), which Powell reached from the grid's 5; no schedule of more steps is
# tuned on these extra values
SIGMA_MIN_GRID_FEW_STEPS = SIGMA_MIN_GRID + (0.5, 2.0, 5.0)


def tune_karras(run, score, steps: int, sigma_max_limit: float = 80.0, refine: int = 40, progress: bool = False) -> dict:
    """The Karras spacing of `steps` steps that maximises score(run(sigmas)): a grid, then Powell's method.

    `run(sigmas)` samples the tuning noise with the sampler being tuned and `score(samples)` says how good they are
    (higher is better: the share of high-quality points, or minus a Frechet distance). The grid covers sigma_max in
    SIGMA_MAX_GRID (up to `sigma_max_limit`, the model's own top), sigma_min in SIGMA_MIN_GRID (SIGMA_MIN_GRID_FEW_STEPS
    for three steps or fewer) and rho in RHO_GRID;
    Powell refines the best point in log space for at most `refine` more evaluations (Karras et al. 2022, eq. 5 is
    the family; the tuning is this course's, in the spirit of Sabour et al. 2024, 'Align Your Steps')."""
    import itertools

    from scipy.optimize import minimize

    _check_steps(steps)
    cache: dict = {}

    def evaluate(lo: float, hi: float, rho: float) -> float:
        key = (round(math.log(lo), 3), round(math.log(hi), 3), round(rho, 2))
        if key not in cache:
            cache[key] = float(score(run(karras_sigmas(steps, lo, hi, rho))))
        return cache[key]

    lows = SIGMA_MIN_GRID_FEW_STEPS if steps <= 3 else SIGMA_MIN_GRID
    grid = [(lo, hi, rho) for hi, lo, rho in itertools.product(SIGMA_MAX_GRID, lows, RHO_GRID)
            if hi <= sigma_max_limit * 1.0001 and lo < hi / 4]
    if progress:
        from tqdm.auto import tqdm
        grid = tqdm(grid, desc="tuning (grid)", leave=False)
    best = max(grid, key=lambda p: evaluate(*p))

    def loss(theta):
        lo, hi, rho = math.exp(theta[0]), math.exp(theta[1]), math.exp(theta[2])
        if not (1e-4 <= lo < hi / 2 and hi <= sigma_max_limit and 1 <= rho <= 12):
            return 1e9  # outside the family we search
        return -evaluate(lo, hi, rho)

    if refine > 0:
        res = minimize(loss, [math.log(best[0]), math.log(best[1]), math.log(best[2])], method="Powell",
                       options={"maxfev": refine, "xtol": 0.05, "ftol": 1e-4})
        if -res.fun > evaluate(*best):
            best = tuple(math.exp(v) for v in res.x)
    lo, hi, rho = best
    return {"sigma_min": round(lo, 5), "sigma_max": round(hi, 4), "rho": round(rho, 3),
            "score": round(evaluate(lo, hi, rho), 5), "evaluations": len(cache)}


def nearest_budget(budgets, nfe: int) -> str:
    """The key of `budgets` ({'10': ..., '20': ...}) nearest `nfe` in log NFE."""
    return min(budgets, key=lambda k: abs(math.log(int(k)) - math.log(max(nfe, 1))))


def tuned_karras(sampling: dict | None, sampler: str, nfe: int) -> dict | None:
    """The tuned Karras parameters of `sampler` at the tuned budget nearest `nfe` (in log NFE), or None."""
    tuned = (sampling or {}).get(sampler) or {}
    return tuned[nearest_budget(tuned, nfe)] if tuned else None


DEFAULT_SAMPLER = "dpmpp_2m"  # what `sample` uses for a model whose card recommends none


def recommended_sampler(recommended: dict | None, nfe: int) -> str:
    """The sampler a model's card recommends ({budget: sampler}) at the budget nearest `nfe` (in log NFE), else
    DEFAULT_SAMPLER."""
    return recommended[nearest_budget(recommended, nfe)] if recommended else DEFAULT_SAMPLER


def default_sigmas(steps: int, nfe: int, sampler: str, schedule: NoiseSchedule | None, sigma_min: float,
                   sigma_max: float, sampling: dict | None = None) -> tuple[torch.Tensor, str]:
    """The noise levels `sample(..., steps=n)` uses when no spacing is given, and a phrase saying which.

    The model's tuned Karras schedule for this sampler at the nearest tuned budget (a shipped checkpoint's card), or
    else Karras spacing over the model's whole noise range: never worse than uniform spacing in lesson 3's
    measurements, though far from a tuned one."""
    p = tuned_karras(sampling, sampler, nfe)
    if p is not None:
        return karras_sigmas(steps, p["sigma_min"], p["sigma_max"], p["rho"]), "karras (tuned for this model)"
    return karras_sigmas(steps, sigma_min, sigma_max), "karras over the model's whole noise range (not tuned)"
