"""What grading costs: the time a worker adds around a graded call, and submissions graded per minute per core.

`python -m course_lib bench grader [--json PATH] [--jobs N] [--quick]`:
1. Graded calls. Ordinary torch functions (nn.MultiheadAttention, a DiT block, a training step, a small elementwise
   formula) are timed called directly and called the way the worker calls a learner's function (its alarm, the
   copies of the inputs and the output, with the worker's audit hook and policy installed), in a fresh process; the
   ratio is what the grader's own machinery costs a learner's function. Medians over repeats.
2. Throughput. The source lessons (their solutions filled in) graded as one batch with --jobs N (default: every core)
   into a temporary folder: submissions per minute per core, with the time per lesson.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _cases():
    """(name, function, inputs) of ordinary torch code, built from a fixed seed."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()

    def attention(x):
        with torch.no_grad():
            return mha(x, x, x, need_weights=False)[0]

    def dit_block(x, c, w):
        b, n, d = x.shape
        mod = (F.silu(c) @ w["ada"].T).chunk(6, -1)
        h = F.layer_norm(x, (d,)) * (1 + mod[1][:, None]) + mod[0][:, None]
        q, k, v = (h @ w["qkv"].T).chunk(3, -1)
        att = (q.view(b, n, 4, -1).transpose(1, 2) @ k.view(b, n, 4, -1).transpose(1, 2).transpose(-1, -2)) / 4
        out = (att.softmax(-1) @ v.view(b, n, 4, -1).transpose(1, 2)).transpose(1, 2).reshape(b, n, d)
        x = x + mod[2][:, None] * out
        h = F.layer_norm(x, (d,)) * (1 + mod[4][:, None]) + mod[3][:, None]
        return x + mod[5][:, None] * (F.gelu(h @ w["fc1"].T) @ w["fc2"].T)

    net = torch.nn.Sequential(torch.nn.Linear(2, 128), torch.nn.SiLU(), torch.nn.Linear(128, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def train_step(x0):
        loss = ((net(x0) - x0.flip(1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    def q_sample(x0, ab, noise):
        return ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * noise

    d = 64
    w = {"ada": torch.randn(6 * d, d, generator=g) / 8, "qkv": torch.randn(3 * d, d, generator=g) / 8,
         "fc1": torch.randn(4 * d, d, generator=g) / 8, "fc2": torch.randn(d, 4 * d, generator=g) / 16}
    return [("nn.MultiheadAttention forward (8 x 32 tokens x 64)", attention,
             {"x": torch.randn(8, 32, 64, generator=g)}),
            ("a DiT block (8 x 32 tokens x 64)", dit_block,
             {"x": torch.randn(8, 32, 64, generator=g), "c": torch.randn(8, 64, generator=g), "w": w}),
            ("a training step (MLP, batch 256)", train_step, {"x0": torch.randn(256, 2, generator=g)}),
            ("q_sample on 16 x 2 points", q_sample,
             {"x0": torch.randn(16, 2, generator=g), "ab": torch.rand(16, generator=g), "noise": torch.randn(16, 2)})]


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_calls(repeats: int) -> list[dict]:
    """Run in a fresh process (the audit hook cannot be removed): each case direct, then through the worker's call."""
    import socket

    import torch

    from ..grading import sandbox, worker

    torch.set_num_threads(1)
    cases = _cases()
    direct = {}
    for name, fn, inputs in cases:
        fn(**inputs)
        direct[name] = _time(lambda: fn(**inputs), repeats)
    ours, theirs = socket.socketpair()
    chan = worker._Channel(ours.fileno())  # opened before confinement, as in the worker
    sandbox.install_hook([measure_calls.__code__])
    sys.audit(sandbox.CONFINE, {"write": [tempfile.gettempdir()], "deny_read": [str(ROOT / "notebooks")],
                                "blocked_modules": ["course_lib.exercises"]})
    records = []
    for name, fn, inputs in cases:
        call = {"inputs": inputs, "procedure": None, "oracles": {}}
        graded = _time(lambda: worker._call(chan, fn, call, 60.0), repeats)
        records.append({"bench": "grader", "case": name, "direct_ms": round(direct[name], 4),
                        "graded_ms": round(graded, 4), "ratio": round(graded / direct[name], 3),
                        "added_us": round((graded - direct[name]) * 1e3, 1), "repeats": repeats})
    theirs.close()
    return records


def _calls_in_fresh_process(repeats: int) -> list[dict]:
    code = ("import json, sys\nfrom course_lib.bench.grader import measure_calls\n"
            f"print(json.dumps(measure_calls({repeats})))")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"the timing process failed: {r.stderr[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def throughput(jobs: int, quick: bool) -> dict:
    """Grade the source lessons (quick: lessons 0, 1 and 3) as one batch; submissions per minute per core."""
    from ..grading import grade_batch

    lessons = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if quick:
        lessons = [p for p in lessons if p.name[:2] in ("00", "01", "03")]
    with tempfile.TemporaryDirectory(prefix="course-bench-grader-") as tmp:
        start = time.monotonic()
        records, totals = grade_batch(lessons, Path(tmp) / "g.csv", jobs=jobs, echo=lambda s: None, scratch_base=tmp)
        seconds = time.monotonic() - start
    cores = min(jobs, os.cpu_count() or 1)
    return {"bench": "grader", "case": "throughput", "submissions": len(records), "jobs": jobs, "cores": cores,
            "seconds": round(seconds, 1), "per_minute_per_core": round(len(records) / (seconds / 60) / cores, 2),
            "points": totals["points"], "max_points": totals["max_points"],
            "per_lesson_s": {Path(r["submission"]).name[:2]: r["seconds"] for r in records}}


def main_grader(quick: bool = False, json_path=None, force: bool = False, jobs: int | None = None) -> list[dict]:
    """Run both measurements; print them; with json_path write the records."""
    import platform

    import torch

    from ..checkpoints import write_json_atomic
    from . import refuse_to_overwrite

    refuse_to_overwrite(json_path, force)
    jobs = jobs or os.cpu_count() or 1
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    where = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
             "date": time.strftime("%Y-%m-%d")}
    records = [{**r, **where} for r in _calls_in_fresh_process(20 if quick else 200)]
    print(f"{'graded call':52s} {'direct ms':>10s} {'graded ms':>10s} {'ratio':>7s} {'added us':>9s}")
    for r in records:
        print(f"{r['case']:52s} {r['direct_ms']:10.3f} {r['graded_ms']:10.3f} {r['ratio']:7.2f} {r['added_us']:9.1f}")
    t = {**throughput(jobs, quick), **where}
    records.append(t)
    print(f"\n{t['submissions']} source lessons graded with --jobs {jobs} in {t['seconds']:.0f} s "
          f"({t['points']}/{t['max_points']} points): {t['per_minute_per_core']:.2f} submissions per minute per core")
    print("seconds per lesson: " + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(t["per_lesson_s"].items())))
    if json_path:
        write_json_atomic(records, json_path)
        print(f"wrote {json_path}")
    return records
