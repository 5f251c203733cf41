"""Where the course runs: quick mode, device choice, seeding, Colab detection."""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .colab import REPO_URL, install_cell  # noqa: F401 (re-exported) where the course is hosted; the install cell every lesson starts with

QUICK_ENV = "COURSE_QUICK"

COLAB_INSTALL_CELL = install_cell()


def is_quick() -> bool:
    """True when COURSE_QUICK is set to 1/true/yes: tiny budgets so a notebook runs in under a minute."""
    value = os.environ.get(QUICK_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{QUICK_ENV} must be 1 or 0 (or true/false), got {value!r}")


def budget(full, quick):
    """Return `quick` in quick mode, else `full` (use for sample sizes, steps, frames)."""
    return quick if is_quick() else full


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.device.type}: {self.name} ({self.reason})"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def device_info(prefer: str | None = None) -> DeviceInfo:
    """Pick cuda, then mps, then cpu (or the one named by `prefer`), with a reason a learner can read."""
    if prefer is not None:
        if prefer not in ("cuda", "mps", "cpu"):
            raise ValueError(f"prefer must be 'cuda', 'mps', 'cpu' or None, got {prefer!r}")
        if prefer == "cuda" and not torch.cuda.is_available():
            raise ValueError("prefer='cuda' but torch.cuda.is_available() is False on this machine")
        if prefer == "mps" and not _mps_available():
            raise ValueError("prefer='mps' but the Apple-silicon MPS backend is not available here")
    if prefer in (None, "cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return DeviceInfo(torch.device("cuda"), f"{props.name}, {props.total_memory / 2**30:.0f} GiB",
                          "CUDA GPU found")
    if prefer in (None, "mps") and _mps_available():
        return DeviceInfo(torch.device("mps"), "Apple GPU", "MPS backend found, no CUDA")
    threads = torch.get_num_threads()
    reason = "requested" if prefer == "cpu" else "no GPU found: everything runs, full budgets take longer"
    return DeviceInfo(torch.device("cpu"), f"CPU, {threads} threads", reason)


def get_device(prefer: str | None = None, verbose: bool = False) -> torch.device:
    """The torch.device the course uses here; prints why when verbose."""
    info = device_info(prefer)
    if verbose:
        print(f"Using {info}")
    return info.device


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (all devices) and return a torch.Generator seeded the same."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def describe_mode() -> str:
    """One line saying which budget mode is on."""
    if is_quick():
        return f"Quick mode ({QUICK_ENV}=1): tiny budgets, results are noisier than in the saved notebook."
    return f"Full mode: full budgets (set {QUICK_ENV}=1 for a run of under a minute)."


def smoke_note(n: int | None = None) -> str:
    """In quick mode, a line to print before a verdict computed in the notebook: its numbers test the code, they are not
    a measurement; "" in full mode."""
    if not is_quick():
        return ""
    size = f", {n:,} samples" if n is not None else ""
    return (f"(quick mode{size}: a smoke test of the code, not a measurement; the saved notebook's full run is the "
            "result)")
