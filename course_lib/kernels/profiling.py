"""Where a sampler's time goes: torch.profiler's operator table, grouped and counted (lesson 5).

`profile_ops(fn, device)` runs `fn` once under torch.profiler (CPU, plus CUDA on a GPU) with the profiler's own
C++ log lines kept out of the notebook, and returns an `OpProfile`: each operator's share of the self time, its
call count, the share of convolution / matmul work against everything else, and the number of aten calls (on a
GPU each is at least one kernel launch).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

HEAVY = ("conv", "mm", "matmul", "linear", "bmm", "addmm", "baddbmm", "_scaled_dot")
# the @triton.jit functions of course_lib.kernels.triton_kernels (tests/test_profiling.py checks the list)
TRITON_KERNELS = ("q_sample_kernel", "lincomb_kernel", "group_norm_silu_kernel")


@contextlib.contextmanager
def silenced():
    """Send the process's own stdout / stderr (file descriptors 1 and 2, where C++ libraries write) to /dev/null."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def kind(name: str) -> str:
    """'convolution / matmul' for the compute-heavy operators, else 'everything else'."""
    return "convolution / matmul" if any(h in name for h in HEAVY) else "everything else"


@dataclass
class OpProfile:
    """Operators by self time: (name, share of the total, calls), largest first."""

    ops: list = field(default_factory=list)
    device: str = "cpu"

    @property
    def calls(self) -> int:
        """aten operator calls in all (each is at least one kernel launch on a GPU)."""
        return sum(c for name, _, c in self.ops if name.startswith("aten::"))

    @property
    def shares(self) -> dict:
        """Share of self time per kind of operator (see `kind`)."""
        out: dict = {}
        for name, share, _ in self.ops:
            out[kind(name)] = out.get(kind(name), 0.0) + share
        return out

    def count(self, names) -> int:
        """Calls of the operators in `names` (e.g. the elementwise aten::mul, aten::add, ...)."""
        return sum(c for name, _, c in self.ops if name in set(names))

    def table(self, top: int = 12) -> str:
        lines = [f"{'operator':<40} {'share':>7} {'calls':>6}"]
        lines += [f"{name if len(name) <= 40 else name[:39] + '~':<40} {share:7.1%} {calls:6d}"
                  for name, share, calls in self.ops[:top]]
        return "\n".join(lines)


def profile_ops(fn, device=None) -> OpProfile:
    """Run fn() once under torch.profiler and return its operators by self time (GPU time on CUDA)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device or "cpu")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with silenced(), profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = _operator_rows([(e.key, getattr(e, attr), e.count) for e in prof.key_averages()], device.type)
    timed = [(k, t, c) for k, t, c in events if t > 0]
    total = sum(t for _, t, _ in timed) or 1.0
    ops = sorted(((k, t / total, c) for k, t, c in timed), key=lambda e: -e[1])
    ops += [(k, 0.0, c) for k, t, c in events if t <= 0]
    return OpProfile(ops, device.type)


def _operator_rows(events: list, device_type: str) -> list:
    """On CUDA the profiler lists each kernel twice: under the aten operator that launched it and under the
    kernel's own name. Keep the operators, plus the course's Triton kernels (`TRITON_KERNELS`: no operator launches
    them), so that every microsecond is counted once and the table reads in operator names."""
    if device_type != "cuda":
        return events
    return [(k, t, c) for k, t, c in events if k.startswith("aten::") or k in TRITON_KERNELS]
