"""`python -m course_lib bench beyond`: lesson 15's measurements, diffusion beyond images, on three training seeds.

Policy (Chi et al. 2023): the diffusion policy and the regression policy (same network, data, batch and steps)
trained on the expert's demonstrations of course_lib.reaching; success over EPISODES episodes from the task's starts
and from START exactly (where the two ways round are equally likely); how the diffusion policy's sampler settings
(steps, the levels' spacing, clipping the denoised chunk) and the executed horizon change it.

Notes: a 1D UNet trained by the diffusion family on course_lib.audio's synthetic notes, judged by pitch and purity
against a Gaussian with the training notes' mean and covariance (the same data's first two moments) and the real
notes themselves, at several sampler budgets.
"""
from __future__ import annotations

import statistics
import time

from . import report, resumable, run_tasks

SEEDS = (0, 1, 2)
QUICK_SEEDS = (0,)
EPISODES = 400  # per policy and setting (a success rate's standard error <= 2.5 points)
QUICK = {"steps": 30, "episodes": 20, "notes": 40}
NOTE_SAMPLES = 1000  # notes generated per model and budget
SAMPLER_STEPS = (1, 2, 5, 10, 20)  # the diffusion policy's denoising steps (DDIM, trailing levels, clipped)
# (spacing, clip) at the recommended 10 steps: the course's default levels, and trailing levels without clipping
VARIANTS = {"karras levels, no clip": ("auto", None), "trailing levels, no clip": ("trailing", None),
            "recommended: trailing levels, clip 1": ("trailing", 1.0)}
HORIZONS = (1, 2, 4, 8)  # moves executed per chunk (receding horizon; the chunk holds reaching.CHUNK)
TARGETS = {"diffusion_success": 0.90}


def _rollout(policy, episodes: int, seed: int, **kw) -> dict:
    from ..reaching import rollout, side_taken

    r = rollout(policy, episodes, seed, **kw)
    return {"success": float(r["success"].double().mean()), "collided": float(r["collided"].double().mean()),
            "right": float((side_taken(r["paths"]) == 1).double().mean()),
            "steps_to_goal": float(r["steps"][r["success"]].double().mean()) if r["success"].any() else None}


def run_policy(seed: int, family: str, episodes: int, quick: bool = False, export: str | None = None) -> list[dict]:
    """Train one policy on one seed through the training loop and roll it out; one record per setting. With `export`
    (a path), also write the trained network as data/ ships it (float16 weights and a card)."""
    from ..policy import POLICY_SAMPLER, POLICY_SPACING, POLICY_STEPS, DiffusionPolicy, RegressionPolicy
    from ..train import Trainer, preset

    name = f"reaching_{family}"
    config = preset(name, seed=seed, **({"steps": QUICK["steps"], "warmup": 2} if quick else {}))
    start = time.perf_counter()
    trainer = Trainer(config).train(progress=False)
    minutes = (time.perf_counter() - start) / 60
    base = {"section": "policy", "seed": seed, "policy": family, "train_minutes": round(minutes, 2),
            "parameters": sum(p.numel() for p in trainer.ema.parameters()), "train_steps": config.steps,
            "final_loss": statistics.mean(trainer.losses[-100:])}
    evaluation = 1000 + seed  # the episodes' starts: the same for both policies of a seed

    def make(**kw):
        return RegressionPolicy(trainer.ema) if family == "regression" else \
            DiffusionPolicy(trainer.ema, trainer.schedule, generator=_generator(seed), **kw)
    records = [{**base, "setting": "default", "execute": 4, **_rollout(make(), episodes, evaluation)},
               {**base, "setting": "from START exactly", **_rollout(make(), episodes, evaluation, start_noise=0.0)}]
    records += [{**base, "setting": "horizon", "execute": h, **_rollout(make(), episodes, evaluation, execute=h)}
                for h in HORIZONS if h != 4]
    if family == "diffusion":
        records += [{**base, "setting": "sampler steps", "sampler_steps": k,
                     **_rollout(make(steps=k), episodes, evaluation)} for k in SAMPLER_STEPS if k != POLICY_STEPS]
        records += [{**base, "setting": v, "sampler_steps": POLICY_STEPS,
                     **_rollout(make(spacing=sp, clip=clip), episodes, evaluation)}
                    for v, (sp, clip) in VARIANTS.items() if not v.startswith("recommended")]
        records[0].update(sampler_steps=POLICY_STEPS, sampler=POLICY_SAMPLER, spacing=POLICY_SPACING)
    if export is not None:
        from .samplers import machine

        card = {"preset": name, "steps": trainer.step, "train_seconds": round(trainer.elapsed, 1), "machine": machine(),
                "command": f"python -m course_lib train --preset {name} --out data/{name}.pt "
                                           "--force --half",
                "made_by": "python -m course_lib bench beyond --export-dir data (seed 0: the same run as the command)",
                "parameters": base["parameters"], "final_loss": round(base["final_loss"], 5),
                "success": records[0]["success"], "episodes": episodes,
                "policy": f"{POLICY_SAMPLER}, {POLICY_STEPS} steps, {POLICY_SPACING} levels, clip 1"}
        trainer.export(export, card, half=True)
        from pathlib import Path

        from ..checkpoints import write_json_atomic

        write_json_atomic(card, Path(export).with_suffix(".json"))
    return records


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(2000 + seed)


NOTE_STEPS = (5, 10, 20, 50)  # DPM-Solver++(2M) steps for the notes model
GAUSSIAN_FIT = 20_000  # training notes the Gaussian baseline is fitted to


def run_notes(seed: int, samples: int, quick: bool = False, export: str | None = None) -> list[dict]:
    """Train the notes preset on one seed, sample it at NOTE_STEPS budgets and judge it beside the Gaussian baseline
    and real notes; one record per model and budget. With `export`, also write the model as data/ ships it."""
    import torch

    from .. import audio
    from ..samplers import sample
    from ..train import Trainer, preset
    from .samplers import machine

    config = preset("notes", seed=seed, **({"steps": QUICK["steps"], "warmup": 2} if quick else {}))
    trainer = Trainer(config).train(progress=False)
    base = {"section": "notes", "seed": seed, "train_minutes": round(trainer.elapsed / 60, 2),
            "parameters": sum(p.numel() for p in trainer.ema.parameters()), "train_steps": config.steps}
    g = torch.Generator().manual_seed(3000 + seed)
    noise = torch.randn(samples, 1, audio.LENGTH, generator=g)

    def judged(x):
        j = audio.judge(x)
        return {k: j[k] for k in ("in_tune", "clean", "purity", "notes_present")} | {"max_note_share": max(j["notes"])}
    records = []
    for k in NOTE_STEPS[:2] if quick else NOTE_STEPS:
        x = sample(trainer.ema, noise, trainer.schedule, "dpmpp_2m", steps=k).x
        records.append({**base, "model": "diffusion", "sampler_steps": k, **judged(x)})
    mean, chol = audio.fit_gaussian(audio.make_notes(GAUSSIAN_FIT, g))
    records.append({**base, "model": "gaussian", **judged(audio.sample_gaussian(mean, chol, samples, g))})
    records.append({**base, "model": "real notes", **judged(audio.make_notes(samples, g))})
    if export is not None:
        from pathlib import Path

        from ..checkpoints import write_json_atomic

        best = next(r for r in records if r["model"] == "diffusion" and r["sampler_steps"] == 20) if not quick \
            else records[0]
        card = {"preset": "notes", "steps": trainer.step, "train_seconds": round(trainer.elapsed, 1),
                "machine": machine(), "parameters": base["parameters"],
                "command": "python -m course_lib train --preset notes --out data/notes.pt --force --half",
                "made_by": "python -m course_lib bench beyond --export-dir data (seed 0: the same run as the command)",
                "final_loss": round(statistics.mean(trainer.losses[-200:]), 5),
                "quality": {"sampler": f"dpmpp_2m, {best['sampler_steps']} steps", "samples": samples,
                            **{k: best[k] for k in ("clean", "in_tune", "purity")}}}
        trainer.export(export, card, half=True)
        write_json_atomic(card, Path(export).with_suffix(".json"))
    return records


RUNS = {"policy": run_policy, "notes": run_notes}


def run_one(section: str, **task) -> list[dict]:
    return RUNS[section](**task)


def _key(t) -> tuple:
    if isinstance(t, list):  # a finished run: its records
        t = t[0]
    return (t["section"], t["seed"], t.get("family", t.get("policy")) if t["section"] == "policy" else None)


def tasks_for(seeds, episodes: int, quick: bool, export_dir=None) -> list[dict]:
    tasks = []
    for seed in seeds:
        for family in ("diffusion", "regression"):
            export = f"{export_dir}/reaching_diffusion.pt" if export_dir and seed == 0 and family == "diffusion" \
                else None
            tasks.append(dict(section="policy", seed=seed, family=family, episodes=episodes, quick=quick,
                              **({"export": export} if export else {})))
    for seed in seeds:
        export = f"{export_dir}/notes.pt" if export_dir and seed == 0 else None
        tasks.append(dict(section="notes", seed=seed, samples=QUICK["notes"] if quick else NOTE_SAMPLES, quick=quick,
                          **({"export": export} if export else {})))
    return tasks


def summarize(records: list[dict], section: str, by: tuple) -> list[dict]:
    """Mean and spread over seeds of every measured number per group of `by`; minutes are the lowest seed's run."""
    from .adapt import summarize as _summarize

    return _summarize(records, section, by)


def verdict(records: list[dict]) -> dict:
    """The issue's target against the means over seeds, and the best sampler budget within a point of 10 steps."""
    rows = {(r["policy"], r["setting"]): r for r in summarize(records, "policy", ("policy", "setting"))}
    out = {}
    d, g = rows.get(("diffusion", "default")), rows.get(("regression", "default"))
    if d is not None:
        out.update(diffusion_success=d["success"], diffusion_target_met=d["success"] >= TARGETS["diffusion_success"])
    if g is not None:
        out["regression_success"] = g["success"]
    if d is not None and g is not None:
        out["gap"] = d["success"] - g["success"]
        seeds = [r for r in records if r["section"] == "policy" and r["setting"] == "default"]
        diffs = [a["success"] - b["success"] for a in seeds for b in seeds if a["seed"] == b["seed"]
                 and a["policy"] == "diffusion" and b["policy"] == "regression"]
        out["gap_min_over_seeds"] = min(diffs) if diffs else None
    exact = {p: rows.get((p, "from START exactly")) for p in ("diffusion", "regression")}
    out.update({f"{p}_exact_start_success": r["success"] for p, r in exact.items() if r is not None})
    by_horizon = summarize([r for r in records if r["section"] == "policy" and r["setting"] in ("default", "horizon")],
                           "policy", ("policy", "execute"))
    for r in by_horizon:  # like with like at every executed horizon: which policy wins there
        out[f"{r['policy']}_execute_{r['execute']}"] = r["success"]
    for h in sorted({r["execute"] for r in by_horizon}):
        pair = {r["policy"]: r["success"] for r in by_horizon if r["execute"] == h}
        if len(pair) == 2:
            out[f"better_at_execute_{h}"] = "tie" if pair["diffusion"] == pair["regression"] else max(pair, key=pair.get)
    notes = summarize(records, "notes", ("model", "sampler_steps"))
    for r in notes:  # clean notes: in tune with the scale and most of their energy at the pitch and its harmonics
        key = "notes_diffusion_{}".format(r["sampler_steps"]) if r["model"] == "diffusion" else \
            "notes_" + r["model"].replace(" ", "_")
        out[key + "_clean"] = r["clean"]
    return out


def table(records: list[dict]) -> str:
    def pm(r, k):
        return f"{r[k]:.3f} ± {r[k + '_std']:.3f}" if r["seeds"] > 1 else f"{r[k]:.3f}"

    lines = []
    rows = summarize(records, "policy", ("policy", "setting", "sampler_steps", "execute"))
    if rows:
        lines.append(f"Policies on the reaching task ({rows[0].get('seeds')} seeds; success, collisions, share going "
                     "round the right):")
        for r in rows:
            what = r["setting"] + (f", {r['sampler_steps']} steps" if r.get("sampler_steps") else "") + \
                (f", execute {r['execute']}" if r.get("execute") and r["setting"] != "from START exactly" else "")
            lines.append(f"  {r['policy']:<10} {what:<52} success {pm(r, 'success')}  collided "
                         f"{pm(r, 'collided')}  right {r['right']:.2f}")
        d = [r for r in rows if r["setting"] == "default"]
        lines.append("  train min: " + ", ".join(f"{r['policy']} {r['train_minutes']:.1f} (seed {r['minutes_seed']})"
                                                 for r in d) + " on one CPU thread")
    notes = summarize(records, "notes", ("model", "sampler_steps"))
    if notes:
        lines.append(f"Notes ({notes[0]['seeds']} seeds; clean: in tune and pure; in tune with the scale; purity; "
                     "notes present of 8):")
        for r in notes:
            what = r["model"] + (f", {r['sampler_steps']} steps" if r.get("sampler_steps") else "")
            lines.append(f"  {what:<22} clean {pm(r, 'clean')}  in tune {pm(r, 'in_tune')}  purity "
                         f"{pm(r, 'purity')}  notes {r['notes_present']:.1f}")
    return "\n".join(lines)


def main_beyond(quick: bool = False, json_path=None, samples: int | None = None, force: bool = False, jobs: int = 1,
                seeds=None, resume: bool = False, export_dir=None) -> list[dict]:
    """Run the benchmark (each finished run saved to JSON_PATH.partial; --resume continues), print the table and the
    verdict; with json_path write the records (flat, one per measurement)."""
    from pathlib import Path

    from .adapt import _flat

    done, on_record = resumable(json_path, force, resume)
    episodes = samples or (QUICK["episodes"] if quick else EPISODES)
    seeds = tuple(seeds) if seeds is not None else (QUICK_SEEDS if quick else SEEDS)
    save = (lambda runs: on_record(_flat(runs))) if on_record is not None else None
    runs = run_tasks(tasks_for(seeds, episodes, quick, export_dir), run_one, _key, jobs, _group(done), save,
                     "bench beyond")
    records = _flat(runs)
    report(records, table(records), verdict(records), json_path)
    if json_path is not None:
        Path(f"{json_path}.partial").unlink(missing_ok=True)
    return records


def _group(records: list[dict]) -> list[list[dict]]:
    runs: dict = {}
    for r in records:
        runs.setdefault(_key(r), []).append(r)
    return list(runs.values())
