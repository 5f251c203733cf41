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
    """One line saying which budget mode is on (and a second when this process runs on fewer CPU threads than torch's
    default because other processes keep cores busy: `configure_threads`)."""
    threads = configure_threads()
    extra = f"\nUsing {threads}." if _THREADS_REDUCED else ""
    if is_quick():
        return f"Quick mode ({QUICK_ENV}=1): tiny budgets, results are noisier than in the saved notebook." + extra
    return f"Full mode: full budgets (set {QUICK_ENV}=1 for a run of under a minute)." + extra


def smoke_note(n: int | None = None) -> str:
    """In quick mode, a line to print before a verdict computed in the notebook: its numbers test the code, they are not
    a measurement; "" in full mode."""
    if not is_quick():
        return ""
    size = f", {n:,} samples" if n is not None else ""
    return (f"(quick mode{size}: a smoke test of the code, not a measurement; the saved notebook's full run is the "
            "result)")


THREADS_ENV = "COURSE_THREADS"
PRECISION_ENV = "COURSE_PRECISION"  # auto (the default) or fp32: autocast_dtype
_THREADS_NOTE: list[str] = []  # what configure_threads decided in this process (it decides once)
_THREADS_REDUCED: list[bool] = []  # non-empty when it chose fewer threads because other processes were busy


def busy_elsewhere(interval: float = 0.3) -> float | None:
    """How many cores other processes keep busy now: the busy share of /proc/stat over `interval` times the cores,
    minus this process's own CPU time (Linux); None where /proc/stat is missing."""
    import time

    def snapshot():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(values), values[3] + values[4]

    try:
        (total0, idle0), cpu0 = snapshot(), time.process_time()
        time.sleep(interval)
        (total1, idle1), cpu1 = snapshot(), time.process_time()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    cores = os.cpu_count() or 1
    busy = (1 - (idle1 - idle0) / (total1 - total0)) * cores
    return max(0.0, busy - (cpu1 - cpu0) / interval)


def _measured_slowdown() -> str:
    """The worst slowdown of torch's default threads beside another process, from the shipped `bench threads`."""
    try:
        from .checkpoints import shipped_json

        rows = shipped_json("bench_threads.json")["summary"]
        worst = max(r["vs_best"] for r in rows if r["condition"] != "quiet" and r["setting"] == "torch default")
        return f" (up to {worst:.0f}x slower, measured by `python -m course_lib bench threads`)"
    except (OSError, ValueError, KeyError):
        return ""


def configure_threads() -> str:
    """Choose this process's CPU threads once, by COURSE_THREADS: unset or "auto", torch's default (fastest on a quiet
    machine) unless other processes keep cores busy now, then only the free cores (torch's threads would otherwise
    wait on the busy ones); a number, that many; "all", torch's default always. Returns what it decided, and why."""
    if _THREADS_NOTE:
        return _THREADS_NOTE[0]
    setting = os.environ.get(THREADS_ENV, "auto").strip().lower() or "auto"
    cores = os.cpu_count() or 1
    if setting.isdigit() and int(setting) >= 1:
        torch.set_num_threads(int(setting))
        note = f"{setting} CPU thread(s), as {THREADS_ENV}={setting} asks"
    elif setting == "all":
        note = f"{torch.get_num_threads()} CPU threads (torch's default, as {THREADS_ENV}={setting} asks)"
    elif setting == "auto":
        busy = busy_elsewhere()
        free = max(1, cores - round(busy or 0))
        if busy is not None and free < torch.get_num_threads():
            torch.set_num_threads(free)
            _THREADS_REDUCED.append(True)
            note = (f"{free} CPU thread(s): other processes keep {busy:.1f} of {cores} cores busy, and torch's default "
                    f"threads would wait on them{_measured_slowdown()}; {THREADS_ENV}=all keeps {cores}")
        else:
            note = f"{torch.get_num_threads()} CPU threads (torch's default: the fastest on a quiet machine)"
    else:
        raise ValueError(f"{THREADS_ENV} must be auto, all or a number of threads, got {setting!r}")
    _THREADS_NOTE.append(note)
    return note


def cpu_has_bf16() -> bool:
    """True when this CPU does bfloat16 arithmetic natively (x86 AVX512-BF16 or AMX), where bf16 autocast is fast;
    elsewhere torch emulates it, slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # private in torch 2.x: absent = no
        check = getattr(cpu, name, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            pass
    return False


def autocast_dtype(device) -> torch.dtype | None:
    """The Trainer's mixed precision on `device` (TrainConfig.amp): bfloat16 on a CUDA GPU that supports it, else
    float16; on a CPU bfloat16 where it is native (cpu_has_bf16: `python -m course_lib bench bf16` measured sample
    quality within fp32's seed spread, and faster steps), else None (fp32). COURSE_PRECISION=fp32 keeps fp32
    everywhere (the shipped checkpoints were trained so)."""
    setting = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if setting not in ("auto", "fp32"):
        raise ValueError(f"{PRECISION_ENV} must be auto or fp32, got {setting!r}")
    device = torch.device(device)
    if setting == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None
