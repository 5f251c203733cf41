"""Few-step students as families of the training loop (lesson 12): consistency distillation and consistency training
(Song et al. 2023, Algorithms 2 and 3; the improved training of Song & Dhariwal 2023), and progressive distillation
(Salimans & Ho 2022, Algorithm 2). A teacher is any shipped or saved diffusion (eps) or EDM model, seen as a denoiser
D(x, sigma) with one sigma per row; a student starts from its weights."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..consistency import (
    DISTANCES,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    SOLVERS,
    consistency_distillation_loss,
    consistency_training_loss,
    improved_ct_steps,
    karras_grid,
    lognormal_grid_indices,
    progressive_target,
)
from .base import Family


def load_teacher(name: str):
    """(a per-row denoiser network, its config) for a shipped name or a path: an EDM model as it is, an eps diffusion
    model through EDMPrecond.from_eps_model (the same function as samplers.as_denoiser)."""
    from ..checkpoints import load_pretrained
    from ..nets import EDMPrecond

    loaded = load_pretrained(name)
    if loaded.config.get("family") == "flow":
        raise ValueError(f"teacher {name!r} is a flow model; few-step students here distil diffusion or EDM models")
    if loaded.schedule is None:
        return loaded.model, loaded.model.config
    net = EDMPrecond.from_eps_model(loaded.model, loaded.config["schedule"], loaded.config["T"])
    return net.eval().requires_grad_(False), net.config


def _check_teacher_data(config) -> None:
    """The teacher (and a consistency model's starting weights) must model the data the student trains on."""
    from ..checkpoints import load_pretrained

    for role in ("teacher", "init"):
        name = getattr(config.options, role, None)
        if name is not None and (data := load_pretrained(name).config.get("data")) != config.data:
            raise ValueError(f"{role} {name!r} was trained on {data!r}, the student on {config.data!r}: start from "
                             "a model of the same data")


def _check_teacher(teacher, required: bool, role: str = "teacher") -> None:
    if teacher is None and required:
        raise ValueError("progressive distillation needs a teacher (a shipped name such as 'digits', or a path)")
    if teacher is not None and not isinstance(teacher, str):
        raise ValueError(f"{role} must be a checkpoint name or path, got {teacher!r}")


def _number(name: str, v, low: float = 0.0) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low < v < math.inf:
        raise ValueError(f"{name} must be a number > {low:g}, got {v!r}")


@dataclass
class ConsistencyOptions:
    teacher: str | None = None          # distillation from this model; None: consistency training (no teacher)
    init: str | None = None             # training: start from this diffusion model's weights (never evaluated: it is
    #                                     no teacher), as Geng et al. 2024 (ECT) tune a pretrained model; None: random
    solver: str = "heun"                # distillation: the teacher's ODE step between neighbouring levels
    intervals: int = 18                 # distillation: N, the Karras grid's intervals; training: the curriculum's start
    max_intervals: int = 1280           # training: the curriculum's end (Song & Dhariwal 2023, eq. 8)
    distance: str = "l2"                # l2 (mean squared) | pseudo_huber
    target_decay: float = 0.95          # distillation: the target network's EMA rate mu (training uses the student)
    sigma_data: float = SIGMA_DATA      # the consistency parameterisation's c_skip / c_out
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX

    def __post_init__(self):
        _check_teacher(self.teacher, False)
        _check_teacher(self.init, False, "init")
        if self.teacher is not None and self.init is not None:
            raise ValueError("give a teacher (distillation starts from its weights) or init (training), not both")
        if self.solver not in SOLVERS or self.distance not in DISTANCES:
            raise ValueError(f"solver must be one of {SOLVERS} and distance one of {DISTANCES}, got "
                             f"{self.solver!r}, {self.distance!r}")
        for name in ("intervals", "max_intervals"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0 <= self.target_decay < 1:
            raise ValueError(f"target_decay must be in [0, 1), got {self.target_decay!r}")
        for name in ("sigma_data", "sigma_min", "sigma_max"):
            _number(name, getattr(self, name))
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"need sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}")


class ConsistencyFamily(Family):
    """With a teacher: Algorithm 2 (a teacher ODE step between neighbouring levels of a fixed grid, the target an EMA
    of the student). Without: improved consistency training (the same noise at both levels, a grid that doubles, levels
    drawn log-normally, the student itself as the target, pseudo-Huber is its usual distance)."""

    name, Options, loss_names = "consistency", ConsistencyOptions, ("loss",)

    def networks(self, config, shape, num_classes):
        from ..nets import build_model

        o = config.options
        if o.teacher is not None or o.init is not None:
            denoiser = load_teacher(o.teacher or o.init)[1]
        else:
            data_keys = {"dim": shape[0]} if len(shape) == 1 else {"in_channels": shape[0]}
            denoiser = build_model({"kind": "edm_precond", "net": {**config.model, **data_keys},
                                    "sigma_data": o.sigma_data}).config
        net = {"kind": "consistency", "denoiser": denoiser, "sigma_data": o.sigma_data, "sigma_min": o.sigma_min,
               "sigma_max": o.sigma_max}
        return {"model": net, "target": dict(net)}  # the target is saved with the run (exact resume), never stepped

    def setup(self, trainer) -> None:
        o = trainer.config.options
        _check_teacher_data(trainer.config)  # here, not in check(): a config names a teacher without loading it
        trainer.schedule = None
        trainer.teacher = load_teacher(o.teacher)[0].to(trainer.device) if o.teacher is not None else None
        trainer.start = trainer.teacher if o.init is None else load_teacher(o.init)[0]
        trainer.grid = karras_grid(o.intervals, o.sigma_min, o.sigma_max)

    def init_networks(self, trainer) -> None:
        if trainer.start is not None:
            trainer.model.denoiser.load_state_dict(trainer.start.state_dict())
        del trainer.start
        trainer.nets["target"].load_state_dict(trainer.model.state_dict())
        trainer.nets["target"].requires_grad_(False)

    def step(self, trainer) -> list:
        x0, _ = trainer.batch()
        loss = self.consistency_loss(trainer, x0)
        trainer.update("model", loss)
        self.update_target(trainer)
        return [loss]

    def consistency_loss(self, trainer, x0: torch.Tensor) -> torch.Tensor:
        """The batch's distillation loss (a teacher) or consistency-training loss (none)."""
        o = trainer.config.options
        g, n = trainer.generator, x0.shape[0]
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        if trainer.teacher is not None:
            i = torch.randint(o.intervals, (n,), generator=g)
            hi, lo = (trainer.grid[i + 1].float().to(x0.device), trainer.grid[i].float().to(x0.device))
            return consistency_distillation_loss(trainer.model, trainer.nets["target"], trainer.teacher, x0, noise,
                                                 hi, lo, o.solver, o.distance)
        k = improved_ct_steps(trainer.step, trainer.config.steps, o.intervals, o.max_intervals)
        grid = karras_grid(k, o.sigma_min, o.sigma_max)
        i = lognormal_grid_indices(n, grid, g)
        hi, lo = grid[i + 1].float().to(x0.device), grid[i].float().to(x0.device)
        return consistency_training_loss(trainer.model, trainer.model, x0, noise, hi, lo, o.distance)

    def update_target(self, trainer) -> None:
        """Distillation's target network follows the student at rate mu (training uses the student itself)."""
        if trainer.teacher is not None:
            with torch.no_grad():
                for t, p in zip(trainer.nets["target"].parameters(), trainer.model.parameters()):
                    t.lerp_(p, 1 - trainer.config.options.target_decay)


def halving_grid(steps: int, sigma_max: float = SIGMA_MAX, rho: float = 7.0) -> torch.Tensor:
    """steps + 1 levels from sigma_max down to 0, evenly spaced in sigma^(1/rho): every other level of the grid of
    2 x steps is this grid, so a student of `steps` steps sees exactly the levels its teacher stepped through."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return (sigma_max ** (1 / rho) * torch.linspace(1, 0, steps + 1, dtype=torch.float64)) ** rho


@dataclass
class ProgressiveOptions:
    teacher: str | None = None          # the model distilled in the first round (required)
    start_steps: int = 32               # the teacher's sampling steps in the first round; halved every round
    final_steps: int = 1                # the last round's student steps
    sigma_max: float = SIGMA_MAX

    def __post_init__(self):
        _check_teacher(self.teacher, True)
        _number("sigma_max", self.sigma_max)
        for name in ("start_steps", "final_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v!r}")
        if self.final_steps * 2 > self.start_steps:
            raise ValueError(f"start_steps ({self.start_steps}) must be at least twice final_steps "
                             f"({self.final_steps}): each round halves the steps")

    @property
    def rounds(self) -> int:
        return int(math.log2(self.start_steps // self.final_steps))


class ProgressiveFamily(Family):
    """Rounds of equal length (config.steps split evenly): in each, the student (a copy of the teacher's network)
    learns to take in one DDIM step what the round's teacher takes in two; then the student becomes the teacher."""

    name, Options, loss_names = "progressive", ProgressiveOptions, ("loss",)

    def check(self, config) -> None:
        if config.steps < config.options.rounds:
            raise ValueError(f"{config.steps} steps cannot be split into {config.options.rounds} rounds")

    def networks(self, config, shape, num_classes):
        denoiser = load_teacher(config.options.teacher)[1]
        return {"model": denoiser, "teacher": dict(denoiser)}  # the round's teacher is saved with the run

    def setup(self, trainer) -> None:
        _check_teacher_data(trainer.config)
        trainer.schedule = None
        trainer.first_teacher = load_teacher(trainer.config.options.teacher)[0]

    def init_networks(self, trainer) -> None:
        for role in ("model", "teacher"):
            trainer.nets[role].load_state_dict(trainer.first_teacher.state_dict())
        trainer.nets["teacher"].requires_grad_(False)
        del trainer.first_teacher

    def round_of(self, config, step: int) -> int:
        return min(step // (config.steps // config.options.rounds), config.options.rounds - 1)

    def step(self, trainer) -> list:
        o, c = trainer.config.options, trainer.config
        r = self.round_of(c, trainer.step)
        if trainer.step > 0 and r != self.round_of(c, trainer.step - 1):  # a new round: the student teaches
            trainer.nets["teacher"].load_state_dict(trainer.model.state_dict())
        student_steps = o.start_steps // 2 ** (r + 1)
        fine = halving_grid(2 * student_steps, o.sigma_max)
        x0, _ = trainer.batch()
        g, n = trainer.generator, x0.shape[0]
        i = torch.randint(student_steps, (n,), generator=g)
        s, mid, nxt = (fine[2 * i].float(), fine[2 * i + 1].float(), fine[2 * i + 2].float())
        s, mid, nxt = s.to(x0.device), mid.to(x0.device), nxt.to(x0.device)
        x = x0 + s.reshape((-1,) + (1,) * (x0.ndim - 1)) * torch.randn(x0.shape, generator=g).to(x0.device)
        target = progressive_target(trainer.nets["teacher"], x, s, mid, nxt)
        weight = (1 / (s * s)).clamp_min(1.0)  # truncated SNR weighting (Salimans & Ho 2022, sec. 4)
        loss = (weight * ((trainer.model(x, s) - target) ** 2).flatten(1).mean(1)).mean()
        trainer.update("model", loss)
        return [loss]
