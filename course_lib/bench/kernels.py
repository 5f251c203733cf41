"""`python -m course_lib bench kernels`: the fused kernels against the eager chains they replace, and sampling loops.

For each op and size: milliseconds, bytes moved, achieved GB/s and the fraction of the device's copy bandwidth
(measured in the same run) for the eager torch reference, torch.compile of it, and the Triton kernel (CUDA only);
then samples per second of the digits UNet's sampling loop eager, compiled and (CUDA) replayed as a CUDA graph.
Every run first checks each Triton kernel against its reference (on a CPU in Triton's interpreter).
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

from . import refuse_to_overwrite

RECORD_KEYS = ("op", "size", "impl", "ms", "gbps", "fraction_of_copy_bw", "device", "max_error", "samples_per_s")
SIZES_MB = {"cuda": (1, 4, 16, 64, 256), "cpu": (1, 4, 16)}
QUICK_SIZES_MB = (1,)


def _record(**kw) -> dict:
    return {k: kw.get(k) for k in RECORD_KEYS}


def time_ms(fn, device: torch.device, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `reps` runs (CUDA events on a GPU, perf_counter elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def copy_bandwidth(n_bytes: int, device: torch.device) -> float:
    """GB/s of dst.copy_(src) for float32 tensors of n_bytes each (one read and one write per element)."""
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (time_ms(lambda: dst.copy_(src), device) * 1e6)


def _ops(n: int, device: torch.device, gen: torch.Generator):
    """name -> (function of impl, tensors of n floats read + written): each op on about n elements."""
    from .. import kernels as K

    r = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    x, d, xe, dn, old = (r(n) for _ in range(5))
    b = 64
    per = max(1, n // b)
    x0, eps = r(b, per), r(b, per)
    ab = torch.linspace(0.9999, 0.001, 1000, dtype=torch.float64)
    sa, s1 = ab.sqrt().float().to(device), (1 - ab).sqrt().float().to(device)
    t = torch.randint(0, 1000, (b,), generator=gen).to(device)
    ch = 64
    spatial = max(1, n // (b * ch))
    img = r(b, ch, spatial)
    norm = torch.nn.GroupNorm(32, ch).to(device).requires_grad_(False)
    return {
        "q_sample_v": (lambda impl: K.q_sample(x0, eps, t, sa, s1, "v", impl=impl), 4),
        "ddim_step": (lambda impl: K.ddim_step(x, d, 3.0, 1.7, impl=impl), 3),
        "heun_correct": (lambda impl: K.heun_correct(x, d, xe, dn, 3.0, 1.7, impl=impl), 5),
        "dpmpp_2m_step": (lambda impl: K.dpmpp_2m_step(x, d, old, 3.0, 1.7, 5.5, impl=impl), 4),
        "group_norm_silu": (lambda impl: K.group_norm_silu(img, norm, impl=impl), 2),
    }


def _max_difference(a, b) -> float:
    """Largest elementwise difference between two outputs (tensors, or tuples of them as q_sample returns)."""
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def check_kernels(device: torch.device) -> list[dict]:
    """Each Triton kernel against its reference on small odd-sized inputs (the interpreter on a CPU)."""
    out = []
    with torch.no_grad():
        for op, (fn, _) in _ops(64 * 97, device, torch.Generator().manual_seed(0)).items():
            err = _max_difference(fn("triton"), fn("torch"))
            out.append(_record(op=op, size=64 * 97 * 4, impl="triton", device=device.type, max_error=err))
    return out


def bench_ops(device: torch.device, sizes_mb, impls, progress=print) -> list[dict]:
    """Time each op at each size for each impl; bandwidth against the copy bandwidth measured at that size."""
    out = []
    with torch.no_grad():
        for mb in sizes_mb:  # the copy bandwidth at each size: small tensors may live in a cache
            copy = copy_bandwidth(mb << 20, device)
            out.append(_record(op="copy", size=mb << 20, impl="torch", ms=None, gbps=copy, fraction_of_copy_bw=1.0,
                               device=device.type))
            n = (mb << 20) // 4
            for op, (fn, moved) in _ops(n, device, torch.Generator().manual_seed(mb)).items():
                for impl in impls:
                    if impl == "compile":
                        # every op and size compiles the same lambda: without a reset, dynamo's recompile limit
                        # (8) is hit by the ninth and the rest silently run eager
                        torch._dynamo.reset()
                        compiled = torch.compile(lambda fn=fn: fn("torch"), dynamic=False)
                        run = compiled
                    else:
                        run = (lambda fn=fn, impl=impl: fn("triton" if impl == "triton" else "torch"))
                    ms = time_ms(run, device, reps=10 if device.type == "cpu" else 20)
                    gbps = moved * n * 4 / (ms * 1e6)
                    out.append(_record(op=op, size=mb << 20, impl=impl, ms=ms, gbps=gbps,
                                       fraction_of_copy_bw=gbps / copy, device=device.type,
                                       max_error=_max_difference(run(), fn("torch"))))
                    progress(f"{op:>16} {mb:>4} MB {impl:>8}: {ms:8.3f} ms, {gbps:7.1f} GB/s "
                             f"({gbps / copy:.0%} of copy)")
    return out


def bench_sampling(device: torch.device, modes, batch: int = 64, nfe: int = 10, progress=print) -> list[dict]:
    """Samples per second of the shipped digits UNet with DPM-Solver++(2M) at `nfe` steps, per loop mode."""
    from ..checkpoints import load_pretrained
    from ..kernels.graphs import LoopSampler
    from ..samplers import get_sigmas

    p = load_pretrained("digits", device=device)
    sig = get_sigmas(nfe, "karras", p.schedule, 0.1, 80.0)
    noise = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    out, ref = [], None
    for mode in modes:
        loop = LoopSampler(p.model, p.schedule, noise.shape, sig, "dpmpp_2m", mode=mode, device=device, clip=1.0)
        ms = time_ms(lambda: loop(noise), device, reps=5 if device.type == "cpu" else 20, warmup=2)
        x = loop(noise)
        ref = x if ref is None else ref
        out.append(_record(op=f"sample_digits_b{batch}_nfe{nfe}", size=batch, impl=mode, ms=ms, device=device.type,
                           samples_per_s=batch / (ms / 1e3), max_error=float((x - ref).abs().max())))
        progress(f"  sampling {mode:>8}: {ms:8.2f} ms per batch of {batch}, {batch / (ms / 1e3):8.0f} samples/s")
    return out


def main_kernels(json_path=None, force: bool = False, quick: bool = False, device=None, progress=print) -> list[dict]:
    """The whole benchmark; returns (and with json_path writes) the records."""
    from ..checkpoints import write_json_atomic
    from ..kernels import triton_available

    refuse_to_overwrite(json_path, force)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    if dev.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first compiled
    records = []
    if triton_available():
        records += check_kernels(dev)
        worst = max(r["max_error"] for r in records)
        progress(f"Triton kernels vs references ({'GPU' if dev.type == 'cuda' else 'CPU interpreter'}): "
                 f"largest difference {worst:.2e} over {len(records)} ops")
    else:
        progress("Triton is not installed: the kernels are not checked (pip install triton)")
    impls = ["eager", "compile"] + (["triton"] if dev.type == "cuda" and triton_available() else [])
    if dev.type != "cuda":
        progress("No CUDA GPU: the Triton kernels' timing needs one. Timing the eager and compiled references on the CPU.")
    sizes = QUICK_SIZES_MB if quick else SIZES_MB["cuda" if dev.type == "cuda" else "cpu"]
    records += bench_ops(dev, sizes, impls if not quick else ["eager"] + impls[2:], progress)
    modes = ["eager"] + ([] if quick else ["compile"]) + (["graph"] if dev.type == "cuda" else [])
    records += bench_sampling(dev, modes, progress=progress)
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    software = software_versions(dev)
    for r in records:
        r["machine"], r["software"] = machine, software
    if json_path:
        write_json_atomic(records, json_path)
    return records


def software_versions(dev: torch.device) -> dict:
    """torch, Triton, and on a GPU CUDA and the driver (from nvidia-smi; None where it cannot be read)."""
    import subprocess

    out = {"torch": torch.__version__, "triton": None}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    if dev.type == "cuda":
        out["cuda"] = torch.version.cuda
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=60)
            out["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            out["driver"] = None
    return out


def summary_lines(records) -> list[str]:
    """Per op, at the largest size: each impl's fraction of copy bandwidth and speed-up over eager."""
    lines = []
    sized = [r for r in records if r["ms"] is not None and r["op"] != "copy" and not r["op"].startswith("sample")]
    if sized:
        big = max(r["size"] for r in sized)
        for op in dict.fromkeys(r["op"] for r in sized):
            rows = {r["impl"]: r for r in sized if r["op"] == op and r["size"] == big}
            eager = rows.get("eager")
            parts = [f"{impl} {r['fraction_of_copy_bw']:.0%} of copy"
                     + (f", {eager['ms'] / r['ms']:.1f}x eager" if eager and impl != "eager" else "")
                     for impl, r in rows.items()]
            lines.append(f"{op} at {big >> 20} MB: " + "; ".join(parts))
        for op in dict.fromkeys(r["op"] for r in sized if r["impl"] == "triton"):
            from_mb = reaches(sized, op, "triton", 0.8)
            lines.append(f"{op}: triton at 80% of copy or more " + (f"from {from_mb} MB up" if from_mb is not None
                                                                     else "at no size measured"))
    for r in records:
        if r["samples_per_s"] is not None:
            lines.append(f"{r['op']} {r['impl']}: {r['samples_per_s']:.0f} samples/s")
    return lines


def reaches(records, op: str, impl: str, fraction: float):
    """The smallest size (MB) from which `impl` of `op` stays at `fraction` of copy bandwidth or more at every larger
    size measured; None when it does not at the largest."""
    rows = sorted((r for r in records if r["op"] == op and r["impl"] == impl and r["ms"] is not None),
                  key=lambda r: -r["size"])
    found = None
    for r in rows:
        if r["fraction_of_copy_bw"] < fraction:
            break
        found = r["size"] >> 20
    return found


def load_json(path) -> list[dict]:
    with open(path) as f:
        return json.load(f)

