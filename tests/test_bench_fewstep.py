"""Lesson 12's few-step benchmark: the verdict and summary against hand computations, the training cost counted by a
hook, one tiny run end to end; the shipped records' shape and targets."""
import math
import statistics
from pathlib import Path

import pytest
import torch

from course_lib.bench import fewstep as B
from course_lib.bench import fewstep_latent as L
from course_lib.checkpoints import read_json

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "bench_fewstep.json"


def _rec(name, seed, fds, recall=0.9, kind="student"):
    rec = {"kind": kind, "name": name, "seed": seed, "samples": 100}
    if kind == "student":
        rec.update(steps=10, train_minutes=1.0, teacher_evaluations=100)
    for nfe, fd in fds.items():
        rec[f"nfe_{nfe}"] = {"fd": fd, "precision": 0.8, "recall": recall, "sampler": "x"}
    return rec


def test_verdict_and_summary_by_hand():
    recs = [_rec("digits_edm", s, {1: 300.0, 2: 100.0, 4: 40.0, 20: v}, kind="teacher")
            for s, v in ((0, 10.0), (1, 12.0))]
    recs += [_rec("digits_cd", s, {1: a, 2: b, 4: b}) for s, a, b in ((0, 15.0, 12.0), (1, 17.0, 14.0))]
    recs += [_rec("digits_pd", s, {1: a, 2: b, 4: b}) for s, a, b in ((0, 20.0, 11.0), (1, 22.0, 13.0))]
    recs += [_rec("digits_add", s, {1: a, 2: 30.0, 4: 30.0}, recall=0.7) for s, a in ((0, 13.0), (1, 15.0))]
    v = B.verdict(recs)
    assert v["teacher_fd_20"] == 11.0
    assert v["best_1_nfe"] == "digits_add" and math.isclose(v["ratio_1_nfe"], 14.0 / 11.0)
    assert v["best_2_nfe"] == "digits_pd" and math.isclose(v["ratio_2_nfe"], 12.0 / 11.0)
    assert v["target_1_nfe_met"] and v["target_2_nfe_met"]
    assert math.isclose(v["adversarial_fd_change_1_nfe"], 14.0 - 16.0)
    assert math.isclose(v["adversarial_recall_change_1_nfe"], 0.7 - 0.9)
    # runner-up at 1 NFE: digits_cd (mean 16, sd sqrt 2) two behind digits_add (mean 14, sd sqrt 2), two seeds each:
    # two standard errors of the difference are 2 * sqrt(2/2 + 2/2) = 2 * sqrt 2 > 2, so not a clear win
    assert v["runner_up_1_nfe"] == "digits_cd" and math.isclose(v["gap_1_nfe"], 2.0)
    assert math.isclose(v["two_se_1_nfe"], 2 * math.sqrt(2.0)) and v["clear_1_nfe"] is False
    # at 2 NFE digits_pd (12) leads digits_cd (13) by one, inside 2 * sqrt(2)
    assert v["runner_up_2_nfe"] == "digits_cd" and v["clear_2_nfe"] is False
    rows = {(r["name"], r["nfe"]): r for r in B.summarize(recs)}
    assert math.isclose(rows[("digits_cd", 1)]["fd_std"], math.sqrt(2.0))
    assert "train_minutes" not in rows[("digits_edm", 20)]
    assert "digits_cd" in B.table(recs)


def test_a_lead_larger_than_two_standard_errors_is_clear_and_one_seed_cannot_say():
    recs = [_rec("digits_edm", s, {1: 300.0, 2: 100.0, 4: 40.0, 20: 10.0}, kind="teacher") for s in (0, 1, 2)]
    recs += [_rec("digits_cd", s, {1: v, 2: v, 4: v}) for s, v in ((0, 15.0), (1, 16.0), (2, 17.0))]
    recs += [_rec("digits_pd", s, {1: v, 2: v, 4: v}) for s, v in ((0, 25.0), (1, 26.0), (2, 27.0))]
    v = B.verdict(recs)
    # sd 1 on each side, three seeds: 2 * sqrt(1/3 + 1/3) = 1.63 < the gap of 10
    assert v["best_1_nfe"] == "digits_cd" and v["clear_1_nfe"] is True
    assert math.isclose(v["two_se_1_nfe"], 2 * math.sqrt(2 / 3))
    one = B.verdict([r for r in recs if r["seed"] == 0])
    assert one["runner_up_1_nfe"] == "digits_pd" and one["clear_1_nfe"] is None and one["two_se_1_nfe"] is None


def test_minutes_are_the_lowest_seeds_run_and_counted_costs_the_mean():
    """Seeds may run on machines of different speed: the table shows one run's minutes (and says whose), never a
    mean over machines; FD is still averaged over every seed."""
    recs = [_rec("digits_cd", s, {1: fd}) for s, fd in ((2, 30.0), (1, 20.0), (3, 40.0))]
    for r, minutes in zip(recs, (9.0, 3.0, 27.0)):
        r["train_minutes"] = minutes
    row = B.summarize(recs)[0]
    assert row["train_minutes"] == 3.0 and row["minutes_seed"] == 1 and row["fd"] == 30.0
    assert row["teacher_evaluations"] == 100
    assert "the training run of seed 1" in B.table(recs)


def test_the_counter_counts_images_through_a_hook():
    net = torch.nn.Linear(3, 3)
    c = B._Counter(net)
    net(torch.zeros(5, 3))
    net(torch.zeros(2, 3))
    assert c.n == 7


def test_unknown_student_and_bad_jobs_are_refused():
    with pytest.raises(ValueError, match="unknown student"):
        B.run_student("digits", 0, 50)
    with pytest.raises(ValueError, match="jobs"):
        B.bench_fewstep(quick=True, jobs=0)


def test_a_quick_progressive_run_keeps_a_student_per_round_and_counts_its_teacher():
    rec = B.run_student("digits_pd", 0, 60, quick=True)
    assert rec["steps"] == B.QUICK_STEPS * 5
    assert sorted(k for k in rec if k.startswith("nfe_")) == ["nfe_1", "nfe_2", "nfe_4"]
    # two teacher calls per image per step: batch 128
    assert rec["teacher_evaluations"] == 2 * 128 * rec["steps"]
    assert rec["nfe_4"]["sigmas"][0] == pytest.approx(80.0) and len(rec["nfe_4"]["sigmas"]) == 5
    assert all(0 <= rec[k]["recall"] <= 1 and rec[k]["fd"] > 0 for k in ("nfe_1", "nfe_2", "nfe_4"))


def _latent(kind, name, seed, alls, binding=0.4):
    rec = {"kind": kind, "name": name, "seed": seed, "samples": 50}
    if kind == "latent_student":
        rec.update(steps=10, train_minutes=2.0, teacher_evaluations=640)
    for nfe, a in alls.items():
        rec[f"nfe_{nfe}"] = {"shape": a, "colour": a, "position": 1.0, "size": a, "all": a, "two_binding": binding,
                             "two_swapped": 0.1, "two_present": 0.6, "network_evals": nfe * (1 if kind == "latent_student" else 2)}
    return rec


def test_the_latent_verdict_by_hand():
    recs = [_latent("latent_teacher", L.TEACHER, s, {1: 0.1, 2: 0.1, 4: 0.2, 20: a}, b)
            for s, a, b in ((0, 1.0, 0.40), (1, 0.98, 0.44))]
    recs += [_latent("latent_student", L.STUDENT, s, {1: 0.8, 2: 0.9, 4: a}, b)
             for s, a, b in ((0, 0.96, 0.30), (1, 0.93, 0.34))]
    v = B.verdict(recs)  # no digits records: only the latent part
    assert math.isclose(v["lcm_all_4_nfe"], 0.945) and not v["lcm_target_all_4_nfe_met"]
    assert math.isclose(v["lcm_binding_4_nfe"], 0.32) and math.isclose(v["teacher_binding_20_nfe"], 0.42)
    assert math.isclose(v["teacher_all_20_nfe"], 0.99)
    rows = {(r["name"], r["nfe"]): r for r in L.summarize_latent(recs)}
    assert math.isclose(rows[(L.STUDENT, 4)]["all_std"], statistics.stdev([0.96, 0.93]))
    assert rows[(L.TEACHER, 20)]["network_evals"] == 40 and "train_minutes" not in rows[(L.TEACHER, 20)]
    assert B.summarize(recs) == [] and L.STUDENT in B.table(recs)
    recs[2]["nfe_4"]["all"] = 0.99
    assert B.verdict(recs)["lcm_target_all_4_nfe_met"]


def test_a_quick_latent_run_counts_its_guided_teacher_calls(monkeypatch):
    import course_lib.data as data_mod

    full = data_mod.shapes_latents
    monkeypatch.setattr(data_mod, "shapes_latents", lambda n=256: full(256))
    rec = L.run_latent_student(0, 20, quick=True)
    assert rec["steps"] == B.QUICK_STEPS and rec["guidance"] == 3.0
    # Heun: two teacher calls per image per step, each a pair (the caption and the empty caption); batch 64
    assert rec["teacher_evaluations"] == 2 * 2 * 64 * rec["steps"]
    assert sorted(k for k in rec if k.startswith("nfe_")) == ["nfe_1", "nfe_2", "nfe_4"]
    for k in ("nfe_1", "nfe_2", "nfe_4"):
        assert rec[k]["network_evals"] == int(k[4:]) and all(0 <= rec[k][m] <= 1 for m in ("all", "two_binding"))


@pytest.mark.skipif(not SHIPPED.exists(), reason="bench fewstep has not been run")
def test_the_shipped_records_cover_every_model_seed_and_budget():
    recs = read_json(SHIPPED)
    latent = [r for r in recs if r["kind"].startswith("latent")]
    recs = [r for r in recs if not r["kind"].startswith("latent")]
    names = {r["name"] for r in recs}
    assert names == {B.TEACHER, *B.STUDENTS}
    for r in recs:
        want = {f"nfe_{n}" for n in B.NFES} | ({f"nfe_{B.TEACHER_NFE}"} if r["kind"] == "teacher" else set())
        assert {k for k in r if k.startswith("nfe_")} == want
    seeds = {r["seed"] for r in recs}
    assert 0 in seeds and seeds <= set(B.SEEDS)
    assert all({r["name"] for r in recs if r["seed"] == s} == {B.TEACHER, *B.STUDENTS} for s in seeds)
    v = B.verdict(recs)
    assert 0 < v["ratio_2_nfe"] < 10 and 0 < v["ratio_1_nfe"] < 10
    latent_seeds = {r["seed"] for r in latent}
    assert 0 in latent_seeds and latent_seeds <= seeds
    assert {(r["name"], r["seed"]) for r in latent} == {(n, s) for n in (L.TEACHER, L.STUDENT) for s in latent_seeds}
    v = L.latent_verdict(latent)
    assert 0.5 < v["lcm_all_4_nfe"] <= 1 and 0 < v["teacher_binding_20_nfe"] <= 1


class _Stop(Exception):
    pass


def _stopping_after(monkeypatch, saves: int):
    """Make the benchmark's run checkpointing raise after its `saves`-th save (the file is written first)."""
    import course_lib.bench as bench_pkg

    real, count = bench_pkg.save_run, [0]

    def save_then_stop(trainer, path, **extra):
        real(trainer, path, **extra)
        count[0] += 1
        if count[0] == saves:
            raise _Stop(trainer.step)

    monkeypatch.setattr(bench_pkg, "save_run", save_then_stop)


@pytest.mark.parametrize("name, every, saves", [("digits_pd", 3, 6), ("digits_cd", 3, 1)])
def test_a_stopped_student_run_continues_from_its_checkpoint_to_the_same_record(tmp_path, monkeypatch, name, every,
                                                                              saves):
    # 4 steps a round: digits_pd is stopped at step 15 (its sixth save), after its 4-step student was kept at the end
    # of round 3 (step 12). Tuning a consistency student's levels is not what is tested (and is slow): its levels
    # here are fixed Karras levels
    from course_lib.step_schedules import karras_sigmas

    monkeypatch.setattr(B, "QUICK_STEPS", 4)
    monkeypatch.setattr(B, "SAVE_EVERY", every)
    monkeypatch.setattr(B, "tuned_levels", lambda model, nfe, tune_n=500: (karras_sigmas(nfe, 0.02, 80.0, 7.0), {}))
    whole = B.run_student(name, 0, 60, quick=True)
    ckpt = tmp_path / "runs" / f"student_{name}_seed0.pt"
    with monkeypatch.context() as m:
        _stopping_after(m, saves)
        with pytest.raises(_Stop):
            B.run_student(name, 0, 60, quick=True, checkpoint=str(ckpt))
    assert ckpt.exists()
    resumed = B.run_student(name, 0, 60, quick=True, checkpoint=str(ckpt))
    for k in ("steps", "teacher_evaluations"):
        assert resumed[k] == whole[k]
    for k in ("nfe_1", "nfe_2", "nfe_4"):
        for m in ("fd", "precision", "recall", "sigmas"):
            assert resumed[k][m] == whole[k][m], (k, m)


def test_a_run_checkpoint_of_another_configuration_is_refused_and_a_fresh_start_clears_old_runs(tmp_path):
    from course_lib.bench import run_checkpoint, runs_folder, save_run, start_or_resume
    from course_lib.train import Trainer, preset

    path = run_checkpoint(tmp_path / "b.json.runs", {"kind": "student", "name": "digits_cd", "seed": 1})
    save_run(Trainer(preset("digits_cd", seed=1, steps=10, warmup=2)), path, teacher_evaluations=5)
    trainer, saved = start_or_resume(preset("digits_cd", seed=1, steps=10, warmup=2), path)
    assert saved == {"teacher_evaluations": 5} and trainer.step == 0
    with pytest.raises(ValueError, match="another configuration"):
        start_or_resume(preset("digits_cd", seed=2, steps=10, warmup=2), path)
    assert runs_folder(tmp_path / "b.json", resume=True).exists()
    assert not runs_folder(tmp_path / "b.json", resume=False).exists()
    assert runs_folder(None, resume=True) is None
