"""Calling a learner's function: the one place an exercise's inputs meet untrusted code (in a check or a worker)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .oracles import OracleRef


@dataclass(frozen=True)
class Raised:
    """What a learner's call gave instead of a tensor: an exception (its class name), or error "" for a non-tensor."""

    error: str
    message: str


def clone_inputs(inputs: dict) -> dict:
    """A copy of an input dict whose tensors the learner's function may modify in place."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def with_oracles(inputs: dict, oracles: dict) -> dict:
    """The inputs with each OracleRef replaced by the callable `oracles[name]` (an oracle, or a proxy to one)."""
    return {k: oracles[v.name] if isinstance(v, OracleRef) else v for k, v in inputs.items()}


def call_learner(fn, inputs: dict, procedure: str | None = None):
    """fn(**inputs) as a tensor, or a Raised describing the exception or the non-tensor it returned.

    With `procedure` (a name in course_lib.grading.harnesses.PROCEDURES), that procedure runs the learner's function
    (a training loop) and its dict of tensors is returned instead."""
    try:
        if procedure is not None:
            from .harnesses import PROCEDURES

            got = PROCEDURES[procedure](fn, **clone_inputs(inputs))
            return {k: v.detach() for k, v in got.items()}
        got = fn(**clone_inputs(inputs))
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # SystemExit too: a check must not stop the notebook
        return Raised(type(e).__name__[:100], _first_line(e))
    if isinstance(got, torch.Tensor):
        return got.detach()
    try:
        return torch.as_tensor(got)
    except Exception:
        return Raised("", "None" if got is None else type(got).__name__[:100])


def _first_line(e: BaseException) -> str:
    try:
        text = str(e)
    except Exception:
        return "(its message could not be read)"
    return text.splitlines()[0][:300] if text else ""
