"""How the course should use a CPU's threads: one training step of the digits UNet and of the ring8 MLP, timed in a
fresh process per threading setting, on a quiet machine and with one busy process beside it, interleaved rounds
(`python -m course_lib bench threads`). The default the course sets (`runtime.configure_threads`) is chosen from it."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

# name -> (environment of the process, threads it sets with torch.set_num_threads: None = torch's default)
SETTINGS = {
    "torch default": ({}, None),
    "passive waiting": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "cores - 1": ({}, -1),
    "passive, cores - 1": ({"OMP_WAIT_POLICY": "PASSIVE"}, -1),
    "1 thread": ({"OMP_NUM_THREADS": "1"}, 1),
}
WORKLOADS = ("digits", "ring8")  # the digits UNet (lessons 2-6) and the ring8 MLP
QUIET_SLACK = 1.10  # the default may cost at most 10% over the best setting on a quiet machine

_WORKER = """
import json, sys, time, torch
from course_lib.train import Trainer, preset
name, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads if threads > 0 else max(1, torch.get_num_threads() + threads))
trainer = Trainer(preset(name))
for _ in range(2):
    trainer.train_step()
wall, cpu = [], []
for _ in range(steps):
    w, c = time.perf_counter(), time.process_time()
    trainer.train_step()
    wall.append(1000 * (time.perf_counter() - w)); cpu.append(1000 * (time.process_time() - c))
print(json.dumps({"wall_ms": wall, "cpu_ms": cpu, "threads": torch.get_num_threads()}))
"""


def _clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                            "GOMP_SPINCOUNT", "COURSE_THREADS")}
    env["COURSE_THREADS"] = "all"  # the worker measures the setting itself, not the course's choice
    return {**env, **extra}


def time_setting(workload: str, setting: str, steps: int) -> dict:
    """One fresh process: the median wall and CPU milliseconds of `steps` training steps under `setting`."""
    env, threads = SETTINGS[setting]
    done = subprocess.run([sys.executable, "-c", _WORKER, workload, str(steps), str(threads or 0)],
                          capture_output=True, text=True, env=_clean_env(env), timeout=3600)
    if done.returncode:
        raise RuntimeError(f"the timing process for {workload}, {setting} failed: {done.stderr[-800:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"workload": workload, "setting": setting, "threads": out["threads"],
            "wall_ms": round(statistics.median(out["wall_ms"]), 2), "cpu_ms": round(statistics.median(out["cpu_ms"]), 2)}


# what runs beside the timed process: nothing, one single-threaded busy loop (a browser tab, a compile), or a second
# training process with torch's default threads (a second notebook running)
CONDITIONS = {
    "quiet": None,
    "one busy process": "while True: pass",
    "another training": ("from course_lib.train import Trainer, preset\n"
                         "t = Trainer(preset('digits'))\nwhile True: t.train_step()"),
}


def run(rounds: int = 3, steps: dict | None = None, progress=print) -> list[dict]:
    """Interleaved rounds: in each, every workload and setting under each condition in turn."""
    steps = steps or {"digits": 8, "ring8": 30}
    records = []
    for r in range(rounds):
        for condition, beside in CONDITIONS.items():
            busy = None
            if beside is not None:
                busy = subprocess.Popen([sys.executable, "-c", beside], env=_clean_env({}),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(3)  # let it start working
            try:
                for workload in steps:
                    for setting in SETTINGS:
                        rec = {**time_setting(workload, setting, steps[workload]), "condition": condition, "round": r,
                               "cores": os.cpu_count()}
                        records.append(rec)
                        progress(f"round {r + 1}/{rounds}, {condition:<16} {workload:<6} {setting:<19} "
                                 f"{rec['wall_ms']:9.1f} ms wall, {rec['cpu_ms']:9.1f} ms CPU ({rec['threads']} threads)")
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Per workload, condition and setting: the median over rounds, and its ratio to the best setting there."""
    rows = []
    keys = sorted({(r["workload"], r["condition"]) for r in records}, key=lambda k: (k[0], list(CONDITIONS).index(k[1])))
    for workload, condition in keys:
        mine = [r for r in records if r["workload"] == workload and r["condition"] == condition]
        ms = {s: statistics.median(r["wall_ms"] for r in mine if r["setting"] == s)
              for s in SETTINGS if any(r["setting"] == s for r in mine)}
        best = min(ms.values())
        rows += [{"workload": workload, "condition": condition, "setting": s, "wall_ms": round(v, 1),
                  "vs_best": round(v / best, 2)} for s, v in ms.items()]
    return rows


def choose(rows: list[dict]) -> tuple[str, str]:
    """The setting with the smallest worst slowdown under a busy process among those within QUIET_SLACK of the best
    on a quiet machine, for every workload; and the sentence that says why."""
    settings = sorted({r["setting"] for r in rows}, key=list(SETTINGS).index)
    ratio = {(r["workload"], r["condition"], r["setting"]): r["vs_best"] for r in rows}
    workloads = sorted({r["workload"] for r in rows})
    quiet_ok = [s for s in settings if all(ratio[(w, "quiet", s)] <= QUIET_SLACK for w in workloads)]
    if not quiet_ok:
        quiet_ok = settings
    busy = sorted({r["condition"] for r in rows} - {"quiet"})
    worst_busy = {s: max(ratio[(w, c, s)] for w in workloads for c in busy) for s in quiet_ok}
    pick = min(quiet_ok, key=lambda s: (worst_busy[s], list(SETTINGS).index(s)))
    quiet_cost = max(ratio[(w, "quiet", pick)] for w in workloads)
    default_busy = max(ratio[(w, c, "torch default")] for w in workloads for c in busy)
    why = (f"{pick}: at most {quiet_cost:.2f}x the best setting on a quiet machine and {worst_busy[pick]:.2f}x the "
           f"best beside another process ({', '.join(busy)}), where torch's default is {default_busy:.1f}x")
    return pick, why


def main_threads(quick: bool, json_path, force: bool) -> int:
    from ..checkpoints import write_json_atomic
    from . import refuse_to_overwrite

    refuse_to_overwrite(json_path, force)
    start = time.perf_counter()
    records = run(rounds=1 if quick else 3, steps={"ring8": 10} if quick else None)
    rows = summarize(records)
    print(f"\n{'workload':<7} {'condition':<17} {'setting':<19} {'ms/step':>9} {'vs best':>8}")
    for r in rows:
        print(f"{r['workload']:<7} {r['condition']:<17} {r['setting']:<19} {r['wall_ms']:>9.1f} {r['vs_best']:>7.2f}x")
    pick, why = choose(rows)
    print(f"\nBest default here: {why} ({time.perf_counter() - start:.0f} s, {os.cpu_count()} cores)")
    if json_path:
        write_json_atomic({"records": records, "summary": rows, "choice": pick, "why": why,
                           "command": "python -m course_lib bench threads" + (" --quick" if quick else "")}, json_path,
                          replace=force)
        print(f"Wrote {json_path}")
    return 0
