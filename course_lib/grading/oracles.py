"""Oracles: the functions a behaviour exercise hands the learner (a denoiser, a model), held by whoever judges.

In `check` an oracle is an ordinary object in the notebook. In the batch grader it lives in the grading parent, which
answers the worker's requests over the channel, so the task's private data (the mixture behind an exact denoiser,
the corpus behind a text denoiser, a network's weights) and the count of calls never enter the submission's process:
a submission can neither read the answer off the oracle nor reset its budget. Each oracle validates its inputs,
enforces its budget and keeps a log of what it saw, which the verdict may use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch


class BudgetExceeded(RuntimeError):
    """The learner's function asked an oracle for more evaluations than the exercise allows."""


@dataclass(frozen=True)
class OracleRef:
    """A placeholder in an exercise's inputs: "pass the oracle called `name` here" (replaced where the call runs)."""

    name: str


@dataclass
class Oracle:
    """A budgeted, validated function: `fn(*args)` on arguments `check(args) -> args` accepted, at most `budget` units
    in all (a call costs `cost(args)`: 1, or the rows of a batch); every accepted call is logged."""

    name: str
    fn: Callable
    check: Callable
    budget: float
    cost: Callable = lambda args: 1
    budget_text: str = ""  # how the budget reads in an error: "one call per step of the 8 steps"
    log: list = field(default_factory=list)  # per accepted call: what `note(args)` returns
    note: Callable = lambda args: {}
    used: float = 0.0
    refused: int = 0  # calls past the budget

    def __call__(self, *args, **kwargs):
        args = self.check(*args, **kwargs)
        cost = float(self.cost(args))
        if self.used + cost > self.budget:
            self.refused += 1
            raise BudgetExceeded(f"{self.name} was asked for more than the budget allows ({self.budget_text})")
        self.used += cost
        self.log.append(self.note(args))
        with torch.no_grad():
            return self.fn(*args)

    def __repr__(self) -> str:
        return f"{self.name} (an oracle of the exercise: {self.budget_text})"


def as_float(value, what: str) -> float:
    """A finite Python float from a number or a one-element tensor, else a ValueError naming `what`."""
    try:
        out = float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{what} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(out):
        raise ValueError(f"{what} must be finite, got {out}")
    return out


def as_points(x, n: int | None, what: str = "x", dim: int = 2) -> torch.Tensor:
    """x as a float64 tensor of shape (n, dim) (any n when None) with finite values, else a ValueError."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != dim or (n is not None and x.shape[0] != n):
        want = f"({n if n is not None else 'N'}, {dim})"
        raise ValueError(f"{what} must be a tensor of shape {want}, got {getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point() or not torch.isfinite(x).all():
        raise ValueError(f"{what} must hold finite floating-point values")
    return x.detach().double()
