"""Data-parallel training across processes, started by `torchrun` (PyTorch's launcher): every rank draws the same
global batch and the same noise from the shared seeded generator, computes the loss on its own slice, and the
gradients are averaged with all_reduce, which is the update DistributedDataParallel makes (Li et al. 2020). So N
processes give the same numbers as one process with the same global batch, and a checkpoint resumes on any number."""
from __future__ import annotations

import os
import sys

import torch


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 when the program was started without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an int, got {os.environ['WORLD_SIZE']!r}") from None


def init(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device): joins the process group torchrun describes (gloo on CPUs, NCCL on
    GPUs, each rank on GPU LOCAL_RANK); (0, 1, device) without torchrun."""
    world = world_size_from_env()
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def part(n: int, rank: int, world: int) -> slice:
    """The rows of a global batch of n that rank `rank` of `world` trains on (contiguous, equal shares)."""
    if n % world:
        raise ValueError(f"the global batch ({n}) must be divisible by the number of processes ({world})")
    k = n // world
    return slice(rank * k, (rank + 1) * k)


def average_gradients(parameters, world: int) -> None:
    """Replace every gradient by its mean over the ranks (all_reduce SUM, then / world)."""
    import torch.distributed as dist

    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def average(values: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a tensor over the ranks (for the logged losses)."""
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values / world


def finish() -> None:
    """Wait for every rank, then leave the process group (a rank that exits with it open is aborted by gloo)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave(code: int = 0):
    """End this rank now, its work written: flush the output and skip the interpreter's teardown, in which gloo's
    threads can still abort the process (SIGABRT, "terminate called without an active exception"; see
    pytorch/pytorch#179291) and so fail a run whose work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
