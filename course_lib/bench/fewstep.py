"""Lesson 12's few-step benchmark: students of the digits EDM teacher at 1, 2 and 4 model evaluations against the
teacher at 20, on one judge; then the latent consistency model of lesson 7's text-to-shapes model against its guided
teacher (course_lib.bench.fewstep_latent).

`python -m course_lib bench fewstep [--quick] [--json PATH] [--force] [--jobs N]` trains each student preset of
lesson 12 on seeds 0, 1 and 2 through the one training loop: consistency distillation (digits_cd), consistency
training from the teacher's weights (digits_ct), progressive distillation 32 -> 1 steps (digits_pd, its students of
4, 2 and 1 steps kept as the rounds end) and consistency distillation with a discriminator (digits_add). A consistency
student's levels at each budget are tuned on the tuning noise (seed 2026, as `tune` does for every shipped model); a
progressive student uses the levels it was trained on. Every model samples the same evaluation noise, and the judge is
the shipped digits classifier's features (FD, precision, recall against the training digits). Training cost is counted,
not estimated: teacher evaluations (one per image per call, by a hook on the teacher) and minutes.
"""
from __future__ import annotations

import math
import shutil
import time

import torch

from . import SAVE_EVERY, minutes_note, report, resumable, run_tasks, runs_folder, seed_rows
from . import ImageCounter as _Counter  # noqa: F401  (the name the tests and fewstep_latent used)

TEACHER, TEACHER_NFE = "digits_edm", 20
STUDENTS = ("digits_cd", "digits_ct", "digits_pd", "digits_add")
NFES = (1, 2, 4)
SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
QUICK_STEPS = 10  # per progressive round, or in all for the others
EVAL_SEED = 1000  # + the run's seed: the evaluation noise (tuning uses step_schedules.TUNE_SEED)
TARGETS = {1: 1.6, 2: 1.25}  # the best student's FD over the teacher's at 20 NFE, at most
# How digits_add's adv_weight was chosen: Trainer(preset("digits_add", adv_weight=w, steps=1000, seed=99)) (0: the
# digits_cd preset), its EMA sampled in one call from sigma 80, FD / precision / recall of 1,000 samples (noise seed 7)
# on 2026-12-06; the weight with the lowest FD above 0 was kept
ADV_WEIGHT_SWEEP = {0.0: (22.19, 0.643, 0.935), 0.003: (31.98, 0.645, 0.891), 0.01: (34.954, 0.632, 0.892),
                    0.03: (37.472, 0.628, 0.897)}


def _evaluate(model, sampler: str, sigmas, noise: torch.Tensor, judge, seed: int) -> dict:
    """FD / precision / recall of the samples from `noise` (clamped to [-1, 1], as every digits model is judged)."""
    from ..samplers import sample

    with torch.no_grad():
        x = sample(model, noise, sampler=sampler, sigmas=sigmas, clip=1.0,
                   generator=torch.Generator().manual_seed(seed)).x.clamp(-1, 1)
    r = judge(x)
    return {k: round(float(r[k]), 4) for k in ("fd", "precision", "recall")}


def tuned_levels(model, nfe: int, tune_n: int = 500) -> tuple[torch.Tensor, dict]:
    """A consistency model's levels at `nfe` evaluations, tuned like every shipped model's (Karras spacing by a grid
    then Powell, minus the FD of samples from noise seed TUNE_SEED, never evaluated on)."""
    from ..samplers import sample
    from ..step_schedules import TUNE_SEED, karras_sigmas, tune_karras
    from .samplers import Judge, tuning_score

    noise = torch.randn(tune_n, 1, 8, 8, generator=torch.Generator().manual_seed(TUNE_SEED))
    judge = Judge("digits", tune_n)

    def run(sigmas):
        with torch.no_grad():
            return sample(model, noise, sampler="consistency", sigmas=sigmas, clip=1.0,
                          generator=torch.Generator().manual_seed(TUNE_SEED)).x.clamp(-1, 1)

    p = tune_karras(run, tuning_score(judge), nfe)
    return karras_sigmas(nfe, p["sigma_min"], p["sigma_max"], p["rho"]), p


def run_teacher(n: int, seed: int = 0) -> dict:
    """The teacher with its card's default sampler at 20 NFE (the reference), and the same sampler at 1, 2, 4 NFE."""
    from ..checkpoints import load_pretrained
    from ..samplers import recommended_sampler, sample
    from .samplers import Judge

    p = load_pretrained(TEACHER)
    judge, noise = Judge("digits", n), torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(EVAL_SEED + seed))
    rec = {"kind": "teacher", "name": TEACHER, "seed": seed, "samples": n}
    for nfe in (*NFES, TEACHER_NFE):
        sampler = recommended_sampler(p.model.recommended_sampler, nfe)
        sig = sample(p.model, noise[:2], sampler=sampler, steps=nfe).sigmas  # the levels `sample` chooses by default
        rec[f"nfe_{nfe}"] = {**_evaluate(p.model, sampler, sig, noise, judge, seed), "sampler": sampler,
                             "sigmas": [round(float(v), 4) for v in sig]}
    return rec


def run_student(name: str, seed: int, n: int, quick: bool = False, export: str | None = None,
                checkpoint: str | None = None) -> dict:
    """Train one student preset on one seed, tune its levels, score it at 1, 2 and 4 NFE; one record. With `export` (a
    path), also write the final student as data/ ships it: float16 weights, a card with its quality and tuned levels
    (the same weights `python -m course_lib train --preset NAME` trains: same preset, seed 0 and steps). With
    `checkpoint` (a path), training is saved there every SAVE_EVERY steps and continued from it if it exists."""
    import copy

    from ..families.fewstep import halving_grid
    from ..train import preset
    from . import save_run, start_or_resume
    from .samplers import Judge

    if name not in STUDENTS:
        raise ValueError(f"unknown student {name!r}; choose one of {STUDENTS}")
    config = preset(name, seed=seed)
    progressive = config.family == "progressive"
    if quick:
        config = preset(name, seed=seed, warmup=2,
                        steps=QUICK_STEPS * (config.options.rounds if progressive else 1))
    trainer, saved = start_or_resume(config, checkpoint)
    teacher = trainer.nets.get("teacher") if progressive else trainer.teacher
    counter = _Counter(teacher) if teacher is not None else None
    if counter is not None:
        counter.n = saved.get("teacher_evaluations", 0)
    models = {}
    for steps, weights in saved.get("kept", {}).items():  # students of the rounds that ended before a stop
        models[int(steps)] = copy.deepcopy(trainer.ema).eval()
        models[int(steps)].load_state_dict(weights)

    def save(t):
        save_run(t, checkpoint, teacher_evaluations=counter.n if counter else 0,
                 kept={str(k): m.state_dict() for k, m in models.items()})

    if progressive:  # keep the EMA student of each of the last rounds: the 4-, 2- and 1-step students
        rounds, length = config.options.rounds, config.steps // config.options.rounds
        for r in range(rounds):
            end, steps = (r + 1) * length if r < rounds - 1 else config.steps, config.options.start_steps // 2 ** (r + 1)
            if trainer.step >= end and (steps not in NFES or steps in models):
                continue  # a round that ended before the stop
            trainer.train(steps=end - trainer.step, progress=False, callback=save, every=SAVE_EVERY)
            if steps in NFES:
                models[steps] = copy.deepcopy(trainer.ema).eval()
                save(trainer)
    else:
        trainer.train(progress=False, callback=save, every=SAVE_EVERY)  # up to config.steps, from where it stopped
        models = {nfe: trainer.ema.eval() for nfe in NFES}
    judge, noise = Judge("digits", n), torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(EVAL_SEED + seed))
    rec = {"kind": "student", "name": name, "family": config.family, "seed": seed, "samples": n,
           "steps": trainer.step, "train_minutes": round(trainer.elapsed / 60, 2),
           "teacher_evaluations": counter.n if counter else 0}
    tuned = {}
    for nfe, model in models.items():
        start = time.perf_counter()
        if progressive:
            sampler, sig, how = "euler", halving_grid(nfe, config.options.sigma_max), "its training grid"
        else:
            sampler, (sig, how) = "consistency", tuned_levels(model, nfe, 100 if quick else 500)
            tuned[str(nfe)] = {**how, "samples": 100 if quick else 500}
        rec[f"nfe_{nfe}"] = {**_evaluate(model, sampler, sig, noise, judge, seed), "sampler": sampler,
                             "sigmas": [round(float(v), 4) for v in sig], "levels": how,
                             "seconds": round(time.perf_counter() - start, 1)}
    if export:
        _export(trainer, name, export, tuned, quick)
    return rec


def _export(trainer, name: str, path: str, tuned: dict, quick: bool) -> None:
    """The student as data/ ships it: half-precision weights and a card (quality, tuned levels, how it was made)."""
    from ..evaluate import sample_quality
    from ..nets import count_parameters
    from .samplers import machine

    card = {"preset": name, "steps": trainer.step, "train_seconds": round(trainer.elapsed, 1), "machine": machine(),
            "command": f"python -m course_lib train --preset {name} --out data/{name}.pt --force --half",
            "made_by": "python -m course_lib bench fewstep --export-dir data (seed 0: the same run as the command)",
            "parameters": count_parameters(trainer.model),
            "final_loss": round(sum(trainer.losses[-200:]) / len(trainer.losses[-200:]), 5)}
    if tuned:  # what `sample` uses by default: the consistency sampler on its tuned levels
        card.update(sampling={"consistency": tuned}, recommended_sampler={k: "consistency" for k in tuned},
                    sampling_tuning={"how": "Karras levels (sigma_min, sigma_max, rho) per budget by a grid then "
                                            "Powell's method, maximising minus the FD of samples from noise seed "
                                            "2026 (never evaluated on)", "command": card["made_by"]})
    from ..checkpoints import load_pretrained, update_card

    trainer.export(path, card, half=True)
    shipped = load_pretrained(path)  # the quality of what ships: fp16 weights, sampled on the card's tuned levels
    card = update_card(path, quality=sample_quality(shipped.model, None, shipped.config, n=200 if quick else 1000))
    from ..checkpoints import write_json_atomic

    write_json_atomic(card, str(path).removesuffix(".pt") + ".json")


def run_one(kind: str, seed: int, n: int, name: str = TEACHER, quick: bool = False, export: str | None = None,
            checkpoint: str | None = None) -> dict:
    from .fewstep_latent import run_latent_student, run_latent_teacher

    if kind.startswith("latent"):  # the text-to-shapes teacher and its latent consistency model (lesson 12, part 5)
        if kind == "latent_teacher":
            return run_latent_teacher(n, seed)
        return run_latent_student(seed, n, quick, export, checkpoint)
    return run_teacher(n, seed) if kind == "teacher" else run_student(name, seed, n, quick, export, checkpoint)


def _key(task_or_record: dict) -> tuple:
    return (task_or_record["kind"], task_or_record.get("name", TEACHER), task_or_record["seed"])


def bench_fewstep(quick: bool = False, samples: int | None = None, progress: bool = True, jobs: int = 1,
                  students=STUDENTS, export_dir=None, seeds=None, done=(), on_record=None,
                  latent: bool = True, runs_dir=None) -> list[dict]:
    """The teacher and every student on every seed, seed by seed (the longest runs first within a seed), then (latent)
    the text-to-shapes teacher and its latent consistency model on every seed; with export_dir, seed 0's students are
    written there as data/ ships them (NAME.pt and NAME.json). Runs whose records are in `done` are skipped;
    on_record(records) is called after each finished run (a partial file); with runs_dir, each training run saves its
    state there as it trains and continues from it (a stopped benchmark loses at most SAVE_EVERY steps of a run)."""
    from . import run_checkpoint

    n = samples or (100 if quick else 1000)
    seeds = tuple(seeds) if seeds is not None else (QUICK_SEEDS if quick else SEEDS)
    order = sorted(students, key=lambda s: ("digits_add", "digits_pd", "digits_cd", "digits_ct").index(s)
                   if s in STUDENTS else 9)
    tasks = []
    for seed in seeds:
        tasks += [dict(kind="teacher", seed=seed, n=n)]
        tasks += [dict(kind="student", name=s, seed=seed, n=n, quick=quick,
                       export=f"{export_dir}/{s}.pt" if export_dir and seed == 0 else None) for s in order]
    if latent:
        from .fewstep_latent import STUDENT
        from .fewstep_latent import TEACHER as LATENT_TEACHER
        m = samples or (100 if quick else 500)
        for seed in seeds:
            tasks += [dict(kind="latent_student", name=STUDENT, seed=seed, n=m, quick=quick,
                           export=f"{export_dir}/{STUDENT}.pt" if export_dir and seed == 0 else None),
                      dict(kind="latent_teacher", name=LATENT_TEACHER, seed=seed, n=m)]
    for task in tasks:
        if "student" in task["kind"]:
            task["checkpoint"] = run_checkpoint(runs_dir, task)
    return run_tasks(tasks, run_one, _key, jobs, done, on_record, "bench fewstep", progress)


def summarize(records: list[dict]) -> list[dict]:
    """Mean and spread over seeds per digits model and budget (fewstep_latent.summarize_latent: the latent ones)."""
    return seed_rows([r for r in records if r["kind"] in ("teacher", "student")], ("fd", "precision", "recall"),
                     ("sampler",))


def verdict(records: list[dict]) -> dict:
    """The best student's mean FD over the teacher's at 20 NFE, at 1 and 2 NFE, against the targets; what the
    discriminator buys at 1 NFE (FD and recall of digits_add minus digits_cd); the latent model's adherence."""
    from .fewstep_latent import latent_verdict

    rows = {(r["name"], r["nfe"]): r for r in summarize(records)}
    ref = rows.get((TEACHER, TEACHER_NFE))
    out: dict = latent_verdict(records)
    if ref is None:
        return out
    out["teacher_fd_20"] = ref["fd"]
    for nfe, target in TARGETS.items():
        ranked = sorted((rows[(s, nfe)] for s in STUDENTS if (s, nfe) in rows), key=lambda r: r["fd"])
        if ranked:
            best = ranked[0]
            out[f"best_{nfe}_nfe"] = best["name"]
            out[f"ratio_{nfe}_nfe"] = best["fd"] / ref["fd"]
            out[f"target_{nfe}_nfe_met"] = best["fd"] / ref["fd"] <= target
        if len(ranked) > 1:
            out.update(_runner_up(ranked[0], ranked[1], nfe))
    if ("digits_add", 1) in rows and ("digits_cd", 1) in rows:
        a, c = rows[("digits_add", 1)], rows[("digits_cd", 1)]
        out["adversarial_fd_change_1_nfe"] = a["fd"] - c["fd"]
        out["adversarial_recall_change_1_nfe"] = a["recall"] - c["recall"]
        out["adversarial_precision_change_1_nfe"] = a["precision"] - c["precision"]
    return out


def _runner_up(best: dict, second: dict, nfe: int) -> dict:
    """The next student at this budget, its FD gap, and two standard errors of a difference of two seed means (None
    with one seed): a gap inside it is one another draw of seeds could reverse."""
    out = {f"runner_up_{nfe}_nfe": second["name"], f"gap_{nfe}_nfe": second["fd"] - best["fd"],
           f"two_se_{nfe}_nfe": None, f"clear_{nfe}_nfe": None}
    if best["seeds"] > 1 and second["seeds"] > 1:
        two_se = 2 * math.sqrt(best["fd_std"] ** 2 / best["seeds"] + second["fd_std"] ** 2 / second["seeds"])
        out[f"two_se_{nfe}_nfe"] = two_se
        out[f"clear_{nfe}_nfe"] = second["fd"] - best["fd"] > two_se
    return out


def table(records: list[dict]) -> str:
    head = (f"{'model':<11} {'NFE':>3} {'sampler':<11} {'seeds':>5} {'FD':>15} {'precision':>9} {'recall':>7} "
            f"{'teacher evals':>13} {'train min':>9}")
    lines = [head]
    for r in summarize(records):
        cost = (f"{r['teacher_evaluations']:>13,.0f} {r['train_minutes']:>9.1f}" if "train_minutes" in r
                else f"{'-':>13} {'-':>9}")
        fd = f"{r['fd']:>7.2f} ± {r['fd_std']:<5.2f}" if r["seeds"] > 1 else f"{r['fd']:>7.2f}{'':8}"
        lines.append(f"{r['name']:<11} {r['nfe']:>3} {r['sampler']:<11} {r['seeds']:>5} "
                     f"{fd} {r['precision']:>9.3f} {r['recall']:>7.3f} {cost}")
    from .fewstep_latent import latent_table

    lines += [n for n in (minutes_note(summarize(records)),) if n]
    return "\n".join(lines) + ("\n\n" + latent_table(records) if latent_table(records) else "")


def main_fewstep(quick: bool = False, json_path=None, samples: int | None = None, force: bool = False,
                 jobs: int = 1, export_dir=None, seeds=None, resume: bool = False) -> list[dict]:
    """Run the benchmark, print the table and the verdict; with json_path write the records. Each finished run is
    saved to JSON_PATH.partial as it ends and each training run's state to JSON_PATH.runs/ as it trains; --resume
    continues from both (a stopped run loses at most SAVE_EVERY steps of each run in flight)."""
    from pathlib import Path

    done, on_record = resumable(json_path, force, resume)
    runs_dir = runs_folder(json_path, resume)
    records = bench_fewstep(quick, samples, jobs=jobs, export_dir=export_dir, seeds=seeds, done=done,
                            on_record=on_record, runs_dir=runs_dir)
    report(records, table(records), verdict(records), json_path)
    if json_path is not None:
        Path(f"{json_path}.partial").unlink(missing_ok=True)
        shutil.rmtree(runs_dir, ignore_errors=True)
    return records
