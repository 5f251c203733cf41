"""Lesson 8's benchmark: a DiT (Peebles & Xie 2023) beside the UNet on digits, at matched parameters, and a small
scaling sweep.

`python -m course_lib bench arch [--quick] [--json PATH] [--force] [--jobs N]` first tunes the learning rate of the
UNet and of the matched DiT the same way (a grid of three rates, extended while the best is at an edge, one training
seed that the comparison does not use, best FD), then trains each architecture with lesson 4's digits budget (the same data, loss, schedule, optimiser,
batch and steps; the UNet is lesson 4's 177k-parameter one) at its own tuned rate, once for the same number of steps
and once (the matched DiT) for the same wall time, then samples every model with the same sampler and scores it with
the same judge (FD, precision, recall). One flat record per run (the tuning runs too, regime 'tune'), plus one
'reference' record: held-out real digits scored like samples.
"""
from __future__ import annotations

import statistics
import time

import torch

from . import refuse_to_overwrite

# The UNet is lesson 4's (COMPARE_UNET, 176,849 parameters); dit_m2 is sized to match it (188,596). The sweep varies
# width and depth at patch 2 (s, m, l: 68k, 189k, 478k) and the patch at the matched size (m1: 64 tokens, not 16).
ARCHS = {
    "unet": None,  # filled from train.COMPARE_UNET at use, so the two benchmarks cannot drift apart
    "dit_s2": dict(kind="dit", patch=2, hidden=32, depth=3, heads=4),
    "dit_m2": dict(kind="dit", patch=2, hidden=48, depth=4, heads=4),
    "dit_l2": dict(kind="dit", patch=2, hidden=64, depth=6, heads=4),
    "dit_m1": dict(kind="dit", patch=1, hidden=48, depth=4, heads=4),
}
MATCHED = "dit_m2"
SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
# The same tuning effort for both architectures: this grid, on a training seed the comparison never uses, extended
# along LADDER while the best rate sits at an edge (at most MAX_EXTENSIONS times). The first full run, at the UNet's
# 1e-3 for both, left the DiT 11x behind the UNet in FD (a verdict on the rate, not the net); the second, on the
# three-rate grid alone, found both best at its top edge.
LRS, QUICK_LRS, TUNE_SEED = (3e-4, 1e-3, 3e-3), (1e-3, 3e-3), 10
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
MAX_EXTENSIONS = 2
RECORD_KEYS = ("kind", "arch", "regime", "seed", "lr", "patch", "hidden", "depth", "parameters", "forward_flops", "steps",
               "batch_size", "train_flops", "seconds_per_step", "train_seconds", "sampler", "nfe", "samples",
               "ms_per_sample", "fd", "fd_at_test_n", "precision", "recall", "class_coverage", "final_loss",
               "loss_curve")


def arch_config(arch: str) -> dict:
    """The model config of a named architecture (kind, sizes); the data decides the channels."""
    from ..train import COMPARE_UNET

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {list(ARCHS)}")
    return dict(COMPARE_UNET) if arch == "unet" else dict(ARCHS[arch])


def train_config(arch: str, seed: int, steps: int | None = None, quick: bool = False, lr: float | None = None):
    """Lesson 4's digits budget (bench.compare.BUDGET) with this architecture; `steps` overrides the step count,
    `lr` the learning rate (default the preset's, 1e-3)."""
    from ..train import preset
    from .compare import BUDGET, QUICK_BUDGET

    budget = dict((QUICK_BUDGET if quick else BUDGET)["digits"])
    if steps is not None:
        budget["steps"] = steps
    if lr is not None:
        budget["lr"] = lr
    return preset("digits", model=arch_config(arch), seed=seed, **budget)


def forward_flops(model: torch.nn.Module, shape=(1, 8, 8), **model_kwargs) -> int:
    """FLOPs of one forward pass on one input, counted by torch's FlopCounterMode on the math path of attention in
    every mode: sdpa forced to its math kernel and nn.MultiheadAttention's fused inference path switched off (in eval
    mode it would skip the counter, which then misses every attention FLOP: 35-45% of a small DiT's)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x, t = torch.zeros(1, *shape, device=p.device), torch.zeros(1, dtype=torch.long, device=p.device)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, t, **model_kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())


def recount_flops(json_path) -> list[dict]:
    """Count the FLOPs of every run record of a saved benchmark again (forward_flops of a fresh model of its
    architecture, train_flops from it, its steps and batch): they depend on the architecture alone. Rewrites the file."""
    import json
    from pathlib import Path

    from ..checkpoints import write_json_atomic
    from ..train import Trainer

    records = json.loads(Path(json_path).read_text())
    counted = {}
    for r in records:
        if r.get("kind") != "run":
            continue
        if r["arch"] not in counted:  # the model the benchmark counts, built the same way (weights do not matter)
            counted[r["arch"]] = forward_flops(Trainer(train_config(r["arch"], 0)).ema)
        r["forward_flops"] = counted[r["arch"]]
        r["train_flops"] = 3 * r["forward_flops"] * r["steps"] * r["batch_size"]
    write_json_atomic(records, json_path)
    return records


def seconds_per_step(arch: str, batch_size: int, steps: int = 10, warmup: int = 3, device=None) -> float:
    """The median wall time of one training step (forward, backward, AdamW) of a fresh model, after `warmup` steps."""
    from ..train import Trainer

    trainer = Trainer(train_config(arch, 0, steps=warmup + steps), device)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = trainer.train_step()
        float(loss.sum())  # wait for the step (a GPU runs ahead of Python)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_one(arch: str, seed: int, regime: str, steps: int, judge, n: int, quick: bool = False, device=None,
            progress: bool = False, lr: float | None = None) -> dict:
    """Train one architecture for `steps` steps with the shared budget (and learning rate `lr`), sample it, judge it
    (judge None: a digits Judge for n samples, made here); one flat record."""
    from ..train import Trainer
    from .compare import DIFFUSION_SAMPLER, curve, generate

    if judge is None:
        from .samplers import Judge
        judge = Judge("digits", n)
    trainer = Trainer(train_config(arch, seed, steps, quick, lr), device)
    trainer.train(progress=progress)
    model = trainer.ema
    x, nfe, seconds = generate(model, "diffusion", "digits", n, seed=1000 + seed, schedule=trainer.schedule)
    scores = judge(x)
    cfg = arch_config(arch)
    flops = forward_flops(model)
    tail = trainer.losses[-(len(trainer.losses) // 20 + 1):]
    record = {"kind": "run", "arch": arch, "regime": regime, "seed": seed, "lr": trainer.config.lr,
              "patch": cfg.get("patch"),
              "hidden": cfg.get("hidden", cfg.get("base")), "depth": cfg.get("depth"),
              "parameters": sum(p.numel() for p in model.parameters()), "forward_flops": flops, "steps": trainer.step,
              "batch_size": trainer.config.batch_size,
              "train_flops": 3 * flops * trainer.step * trainer.config.batch_size,  # backward ~ 2x forward
              "seconds_per_step": round(trainer.elapsed / max(trainer.step, 1), 5),
              "train_seconds": round(trainer.elapsed, 2), "sampler": f"{DIFFUSION_SAMPLER}, karras, {nfe} NFE",
              "nfe": nfe, "samples": n, "ms_per_sample": round(1000 * seconds / n, 4),
              "final_loss": round(sum(tail) / len(tail), 5), "loss_curve": curve(trainer.losses)}
    record.update({k: scores.get(k) for k in ("fd", "fd_at_test_n", "precision", "recall", "class_coverage")})
    return {k: record.get(k) for k in RECORD_KEYS}


def plan(quick: bool) -> list[tuple[str, str, int]]:
    """(arch, regime, seed) of every comparison run: the UNet and the matched DiT on every seed at equal steps and
    (the DiT) at equal time; the rest of the sweep on the first seed."""
    seeds = QUICK_SEEDS if quick else SEEDS
    runs = [(a, "equal_steps", s) for s in seeds for a in ("unet", MATCHED)]
    runs += [(MATCHED, "equal_time", s) for s in seeds]
    sweep = ("dit_s2", "dit_m1") if quick else ("dit_s2", "dit_l2", "dit_m1")
    return runs + [(a, "equal_steps", seeds[0]) for a in sweep]


def tuned_lr(records: list[dict], arch: str) -> float:
    """The learning rate of `arch`'s family (the UNet, or any DiT) with the lowest FD among the tuning runs."""
    key = "unet" if arch == "unet" else MATCHED
    tune = [r for r in records if r.get("regime") == "tune" and r["arch"] == key]
    if not tune:
        raise ValueError(f"no tuning runs of {key} in the records")
    return min(tune, key=lambda r: r["fd"])["lr"]


def _extend(grid: list[float], best: float) -> float | None:
    """The next LADDER rate beyond the grid's edge where the best rate sits at that edge (None if interior)."""
    if best == max(grid) and max(grid) in LADDER and LADDER.index(max(grid)) + 1 < len(LADDER):
        return LADDER[LADDER.index(max(grid)) + 1]
    if best == min(grid) and min(grid) in LADDER and LADDER.index(min(grid)) > 0:
        return LADDER[LADDER.index(min(grid)) - 1]
    return None


def _run_all(tasks: list[dict], jobs: int, progress: bool, desc: str, fn=None) -> list[dict]:
    """fn (default run_one) for every task (keyword dicts), in `jobs` processes of one thread each when jobs > 1;
    input order. fn must be a module-level function (the processes import it by name)."""
    fn = fn or run_one
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(tasks), desc=desc, unit="run")
    if jobs <= 1:
        out = []
        for task in tasks:
            out.append(fn(**task))
            if progress:
                bar.update()
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                    initargs=(1,)) as pool:
            futures = [pool.submit(fn, **task) for task in tasks]
            for f in cf.as_completed(futures):
                f.result()
                if progress:
                    bar.update()
            out = [f.result() for f in futures]
    if progress:
        bar.close()
    return out


def bench_arch(quick: bool = False, samples: int | None = None, device=None, progress: bool = True,
               jobs: int = 1) -> list[dict]:
    """Tune each architecture's learning rate, then every run of `plan(quick)` at the tuned rates; equal-time steps
    come from timing both architectures first, on this machine, one after the other."""
    from .compare import BUDGET, QUICK_BUDGET
    from .samplers import Judge

    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    n = samples or (200 if quick else 1000)
    budget = (QUICK_BUDGET if quick else BUDGET)["digits"]
    ref = Judge("digits", n).real_floor()
    records = [{"kind": "reference", "arch": "held-out real digits", "samples": ref.get("samples"),
                "fd": ref.get("fd"), "fd_at_test_n": ref.get("fd"), "precision": ref.get("precision"),
                "recall": ref.get("recall")}]
    timing = {a: seconds_per_step(a, budget["batch_size"], device=device) for a in ("unet", MATCHED)}
    equal_time_steps = max(1, round(budget["steps"] * timing["unet"] / timing[MATCHED]))
    common = dict(judge=None, n=n, quick=quick, device=device)
    grids = {a: list(QUICK_LRS if quick else LRS) for a in ("unet", MATCHED)}
    todo = [(a, lr) for a in grids for lr in grids[a]]
    for _ in range(MAX_EXTENSIONS + 1):
        tune = [dict(arch=a, seed=TUNE_SEED, regime="tune", steps=budget["steps"], lr=lr, **common) for a, lr in todo]
        records += _run_all(tune, jobs, progress, "bench arch: tuning")
        todo = [(a, nxt) for a in grids if (nxt := _extend(grids[a], tuned_lr(records, a))) is not None]
        for a, lr in todo:
            grids[a].append(lr)
        if not todo:
            break
    runs = [dict(arch=a, seed=s, regime=regime, lr=tuned_lr(records, a),
                 steps=equal_time_steps if regime == "equal_time" else budget["steps"], **common)
            for a, regime, s in plan(quick)]
    done = _run_all(runs, jobs, progress, "bench arch")
    for rec in done:
        if rec["regime"] == "equal_time":
            rec["timed_seconds_per_step"] = {a: round(v, 5) for a, v in timing.items()}
    return records + done


def summarize(records: list[dict]) -> list[dict]:
    """Mean and standard deviation of FD (and the rest) over seeds, per (arch, regime)."""
    from .compare import mean_std

    rows = []
    runs = [r for r in records if r.get("kind") == "run" and r.get("regime") != "tune"]
    for arch, regime in dict.fromkeys((r["arch"], r["regime"]) for r in runs):
        group = [r for r in runs if r["arch"] == arch and r["regime"] == regime]
        rows.append({"arch": arch, "regime": regime, "seeds": len(group), "parameters": group[0]["parameters"],
                     "steps": group[0]["steps"], "train_flops": group[0]["train_flops"], "lr": group[0].get("lr"),
                     **mean_std(group, ("fd", "fd_at_test_n", "precision", "recall", "train_seconds",
                                        "ms_per_sample"))})
    return rows


def verdict(records: list[dict], tolerance: float = 0.15) -> dict:
    """The matched DiT against the UNet at equal steps: FD ratio (mean over seeds), whether the DiT is within
    `tolerance` of the UNet's FD ('within': a tie for practical purposes), whether the two means are further apart
    than the sum of their seed-to-seed standard deviations ('separated'), and the seed spread of each."""
    rows = {(r["arch"], r["regime"]): r for r in summarize(records)}
    unet, dit = rows.get(("unet", "equal_steps")), rows.get((MATCHED, "equal_steps"))
    if unet is None or dit is None:
        raise ValueError("the records hold no equal-steps runs of both the UNet and the matched DiT")
    ratio = dit["fd"] / unet["fd"]
    out = {"unet_fd": unet["fd"], "unet_fd_std": unet["fd_std"], "dit_fd": dit["fd"], "dit_fd_std": dit["fd_std"],
           "ratio": ratio, "within": ratio <= 1 + tolerance, "winner": "dit" if ratio < 1 else "unet",
           "separated": abs(dit["fd"] - unet["fd"]) > dit["fd_std"] + unet["fd_std"],
           "seeds": min(unet["seeds"], dit["seeds"])}
    timed = rows.get((MATCHED, "equal_time"))
    if timed is not None:
        out.update(equal_time_fd=timed["fd"], equal_time_fd_std=timed["fd_std"], equal_time_steps=timed["steps"],
                   equal_time_ratio=timed["fd"] / unet["fd"])
    return out


def table(records: list[dict]) -> str:
    """The tuning runs and the summary as aligned text."""
    lines = ["learning-rate tuning (training seed %d, FD):" % TUNE_SEED]
    for arch in ("unet", MATCHED):
        tune = sorted((r for r in records if r.get("regime") == "tune" and r["arch"] == arch), key=lambda r: r["lr"])
        if tune:
            lines.append(f"  {arch:<8}" + "  ".join(f"lr {r['lr']:g}: {r['fd']:.1f}" for r in tune))
    lines.append(f"{'arch':<8} {'regime':<12} {'lr':>6} {'params':>8} {'steps':>6} {'GFLOP':>8} {'FD':>15} "
                 f"{'FD@ref n':>9} {'precision':>9} {'recall':>7} {'train s':>8} {'ms/sample':>9}")
    for r in summarize(records):
        fd = f"{r['fd']:.1f} ± {r['fd_std']:.1f}" if r["seeds"] > 1 else f"{r['fd']:.1f}"
        lines.append(f"{r['arch']:<8} {r['regime']:<12} {r['lr']:>6g} {r['parameters']:>8,} {r['steps']:>6} "
                     f"{r['train_flops'] / 1e9:>8.1f} {fd:>15} {r.get('fd_at_test_n', float('nan')):>9.1f} "
                     f"{r['precision']:>9.3f} {r['recall']:>7.3f} {r['train_seconds']:>8.1f} {r['ms_per_sample']:>9.3f}")
    ref = next((r for r in records if r.get("kind") == "reference"), None)
    if ref and ref.get("fd") is not None:
        lines.append(f"held-out real digits scored like samples: FD {ref['fd']:.1f} at their size, n = {ref['samples']} "
                     f"(compare with the FD@ref n column; the judge's reference is the training set)")
    return "\n".join(lines)


def main_arch(quick: bool = False, json_path=None, samples: int | None = None, force: bool = False,
              jobs: int = 1) -> list[dict]:
    """Run the benchmark; print the table and the verdict; with json_path write the records."""
    from ..checkpoints import write_json_atomic

    refuse_to_overwrite(json_path, force)
    records = bench_arch(quick, samples, jobs=jobs)
    print(table(records))
    v = verdict(records)
    print(f"matched DiT / UNet FD at equal steps: {v['ratio']:.2f} ({'within' if v['within'] else 'outside'} 15%; "
          f"{v['winner']} wins)")
    if json_path:
        write_json_atomic(records, json_path)
        print(f"wrote {json_path}")
    return records
