"""The latent part of lesson 12's few-step benchmark (`python -m course_lib bench fewstep`): the latent consistency
model shapes_lcm, distilled from lesson 7's shapes_ldm with guidance w = 3 folded in, at 1, 2 and 4 consistency-sampler
calls, against the guided teacher (DPM-Solver++(2M), w = 3) at 1, 2, 4 and 20; prompt adherence and binding as lesson
7 measures them (course_lib.lcm), on the same prompts and noise (seed EVAL_SEED + the run's seed) for both."""
from __future__ import annotations

from ..lcm import KEYS, NFES

STUDENT, TEACHER, TEACHER_NFE = "shapes_lcm", "shapes_ldm", 20
TARGET_ALL_4 = 0.95  # the student's one-object adherence ('all' attributes right) at 4 calls, at least
EVAL_SEED = 1000
QUICK_STEPS = 10  # bench fewstep's --quick budget


def run_latent_teacher(n: int, seed: int = 0) -> dict:
    from ..lcm import adherence_by_budget
    from ..text2image import load_text_to_image

    model = load_text_to_image(TEACHER)
    return {"kind": "latent_teacher", "name": TEACHER, "seed": seed, "samples": n, "guidance": model.card["best_scale"],
            **adherence_by_budget(model, n=n, seed=EVAL_SEED + seed)}


def run_latent_student(seed: int, n: int, quick: bool = False, export: str | None = None,
                       checkpoint: str | None = None) -> dict:
    """Train shapes_lcm on one seed through the training loop, count its teacher's network evaluations, and measure
    it at 1, 2 and 4 calls; with `export`, write it as data/ ships it (fp16, card measured on the shipped weights);
    with `checkpoint`, save the training there every SAVE_EVERY steps and continue from it if it exists."""
    from ..lcm import adherence_by_budget, from_trainer
    from ..train import preset
    from . import SAVE_EVERY, ImageCounter, save_run, start_or_resume

    config = preset(STUDENT, seed=seed, **({"steps": QUICK_STEPS, "warmup": 2} if quick else {}))
    trainer, saved = start_or_resume(config, checkpoint)
    counter = ImageCounter(trainer.teacher)
    counter.n = saved.get("teacher_evaluations", 0)
    trainer.train(progress=False, callback=lambda t: save_run(t, checkpoint, teacher_evaluations=counter.n),
                  every=SAVE_EVERY)
    student = from_trainer(trainer)
    rec = {"kind": "latent_student", "name": STUDENT, "family": config.family, "seed": seed, "samples": n,
           "guidance": config.guidance, "steps": trainer.step, "train_minutes": round(trainer.elapsed / 60, 2),
           "teacher_evaluations": counter.n, **adherence_by_budget(student, n=n, seed=EVAL_SEED + seed)}
    if export:
        _export(trainer, student.card, export, n)
    return rec


def _export(trainer, extra: dict, path: str, n: int) -> None:
    from ..checkpoints import update_card, write_json_atomic
    from ..lcm import adherence_by_budget, load_lcm
    from ..nets import count_parameters
    from .samplers import machine

    card = {"preset": STUDENT, "steps": trainer.step, "train_seconds": round(trainer.elapsed, 1), "machine": machine(),
            "command": f"python -m course_lib train --preset {STUDENT} --out data/{STUDENT}.pt --force --half",
            "made_by": "python -m course_lib bench fewstep --export-dir data (seed 0: the same run as the command)",
            "parameters": count_parameters(trainer.model),
            "final_loss": round(sum(trainer.losses[-200:]) / len(trainer.losses[-200:]), 5), **extra}
    trainer.export(path, card, half=True)
    card = update_card(path, quality=adherence_by_budget(load_lcm(path), n=n))  # what ships: the fp16 weights
    write_json_atomic(card, str(path).removesuffix(".pt") + ".json")


def summarize_latent(records: list[dict]) -> list[dict]:
    """Mean and spread over seeds per model (the teacher first) and budget of the adherence measures."""
    from . import seed_rows

    latent = sorted((r for r in records if r["kind"].startswith("latent")), key=lambda r: r["name"] != TEACHER)
    return seed_rows(latent, (*KEYS, "two_binding", "two_swapped", "two_present"), ("network_evals",))


def latent_verdict(records: list[dict]) -> dict:
    """The student's adherence at 4 calls against the target, and its binding beside the teacher's at 20 NFE."""
    rows = {(r["name"], r["nfe"]): r for r in summarize_latent(records)}
    out = {}
    if (STUDENT, 4) in rows:
        out["lcm_all_4_nfe"] = rows[(STUDENT, 4)]["all"]
        out["lcm_target_all_4_nfe_met"] = rows[(STUDENT, 4)]["all"] >= TARGET_ALL_4
        out["lcm_binding_4_nfe"] = rows[(STUDENT, 4)]["two_binding"]
    if (TEACHER, TEACHER_NFE) in rows:
        out["teacher_all_20_nfe"] = rows[(TEACHER, TEACHER_NFE)]["all"]
        out["teacher_binding_20_nfe"] = rows[(TEACHER, TEACHER_NFE)]["two_binding"]
    return out


def latent_table(records: list[dict]) -> str:
    rows = summarize_latent(records)
    if not rows:
        return ""
    lines = [f"{'model':<11} {'NFE':>3} {'net evals':>9} {'seeds':>5} {'shape':>6} {'colour':>6} {'pos':>5} "
             f"{'size':>5} {'all':>14} {'binding':>14} {'swapped':>7} {'present':>7} {'teacher evals':>13} "
             f"{'train min':>9}"]
    for r in rows:
        cost = (f"{r['teacher_evaluations']:>13,.0f} {r['train_minutes']:>9.1f}" if "train_minutes" in r
                else f"{'-':>13} {'-':>9}")
        lines.append(f"{r['name']:<11} {r['nfe']:>3} {r['network_evals']:>9} {r['seeds']:>5} {r['shape']:>6.3f} "
                     f"{r['colour']:>6.3f} {r['position']:>5.3f} {r['size']:>5.3f} "
                     f"{r['all']:>7.3f} ± {r['all_std']:<4.3f} {r['two_binding']:>7.3f} ± {r['two_binding_std']:<4.3f} "
                     f"{r['two_swapped']:>7.3f} {r['two_present']:>7.3f} {cost}")
    from . import minutes_note

    return "\n".join(lines + [n for n in (minutes_note(rows),) if n])


__all__ = ["NFES", "run_latent_student", "run_latent_teacher", "summarize_latent", "latent_verdict", "latent_table"]
