"""Lesson 12's few-step benchmark: the verdict and summary against hand computations, the training cost counted by a
hook, one tiny run end to end; the shipped records' shape and targets."""
import math
from pathlib import Path

import pytest
import torch

from course_lib.bench import fewstep as B
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
    rows = {(r["name"], r["nfe"]): r for r in B.summarize(recs)}
    assert math.isclose(rows[("digits_cd", 1)]["fd_std"], math.sqrt(2.0))
    assert "train_minutes" not in rows[("digits_edm", 20)]
    assert "digits_cd" in B.table(recs)


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


@pytest.mark.skipif(not SHIPPED.exists(), reason="bench fewstep has not been run")
def test_the_shipped_records_cover_every_model_seed_and_budget():
    recs = read_json(SHIPPED)
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
