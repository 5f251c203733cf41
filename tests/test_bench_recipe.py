"""Lesson 11's benchmark (course_lib.bench.recipe): lesson 2's recipe to EDM's one change at a time, run end to end on
a tiny budget, its summary and verdict, and the shipped full run's records."""
import json
from pathlib import Path

import pytest

from course_lib.bench import recipe
from course_lib.train import preset

DATA = Path(__file__).resolve().parents[1] / "data"


def test_each_arm_changes_one_thing_from_the_arm_before_it():
    configs = [recipe.train_config(a, 0, 1e-3).to_dict() for a in recipe.CHAIN]
    base = preset("digits").to_dict()
    assert configs[0] == {**base, "seed": 0, "lr": 1e-3}  # the first arm is lesson 2's own preset
    changed = [{k for k in b if a.get(k) != b[k]} for a, b in zip(configs[1:], configs[2:])]
    assert changed == [{"loss_weight"}, {"noise"}]  # then one option at a time within the EDM family
    assert configs[1]["noise"] == "uniform_t" and configs[1]["schedule"] == base["schedule"]
    assert configs[1]["loss_weight"] == "eps" and configs[1]["sigma_data"] == recipe.DIGITS_STD
    assert all(c["steps"] == base["steps"] and c["batch_size"] == base["batch_size"] and c["model"] == base["model"]
               for c in configs)


def test_the_digits_std_is_the_sigma_data_the_arms_use():
    from course_lib.data import digits_split

    assert float(digits_split("train")[0].std()) == pytest.approx(recipe.DIGITS_STD, abs=0.01)


def _run(arm, seed, regime, fd, lr=1e-3, **extra):
    return {"kind": "run", "arm": arm, "regime": regime, "seed": seed, "lr": lr, "steps": 10, "fd_10": fd + 1,
            "fd_35": fd, **extra}


def test_summary_and_verdict_are_means_over_seeds():
    records = [_run("lesson2", s, "equal_steps", fd, fd_35_top=fd * 3) for s, fd in enumerate((10.0, 12.0, 14.0))]
    records += [_run("edm", s, "equal_steps", fd) for s, fd in enumerate((7.0, 8.0, 9.0))]
    records += [_run("edm", s, "half_steps", fd) for s, fd in enumerate((11.0, 12.0, 13.0))]
    records += [_run("v", s, "equal_steps", 20.0, fd_35_top=21.0) for s in range(3)]
    rows = {(r["arm"], r["regime"]): r for r in recipe.summarize(records)}
    assert rows[("lesson2", "equal_steps")]["fd_35"] == pytest.approx(12.0)
    assert rows[("lesson2", "equal_steps")]["fd_35_std"] == pytest.approx(2.0)
    v = recipe.verdict(records)
    assert v["edm_over_lesson2"] == pytest.approx(8 / 12) and v["beats_by_20pct"]
    assert v["half_steps_over_lesson2"] == pytest.approx(1.0) and v["matches_in_half"]
    assert v["lesson2_top_over_tuned"] == pytest.approx(3.0) and v["v_top_over_tuned"] == pytest.approx(1.05)
    worse = [dict(r, fd_35=r["fd_35"] * 1.3) if r["arm"] == "edm" else r for r in records]
    assert not recipe.verdict(worse)["beats_by_20pct"]


def test_the_benchmark_runs_end_to_end_and_never_overwrites(tmp_path, monkeypatch, capsys):
    """Three of the arms (lesson 2's, EDM's, v), a few network calls per sample: the whole pipeline in a minute."""
    monkeypatch.setattr(recipe, "QUICK_STEPS", 4)
    monkeypatch.setattr(recipe, "NFES", (2, 3))
    monkeypatch.setattr(recipe, "POSTHOC_SIGMA_REL", (0.05, 0.1))
    monkeypatch.setattr(recipe, "CHAIN", ("lesson2", "edm"))
    monkeypatch.setattr(recipe, "ARMS", {a: recipe.ARMS[a] for a in ("lesson2", "edm", "v")})
    path = tmp_path / "recipe.json"
    records = recipe.main_recipe(quick=True, json_path=path, samples=60, export_dir=str(tmp_path))
    assert json.loads(path.read_text()) == records
    runs = [r for r in records if r["kind"] == "run" and r["regime"] != "tune"]
    assert sorted((r["arm"], r["regime"]) for r in runs) == sorted(
        [(a, "equal_steps") for a in recipe.ARMS] + [("edm", "half_steps")])
    assert all(r["steps"] == (2 if r["regime"] == "half_steps" else 4) for r in runs)
    for r in runs:
        assert r["fd_2"] > 0 and r["fd_3"] > 0 and len(r["mse_by_sigma"]) == len(recipe.LOSS_SIGMAS)
        assert ("fd_35_top" in r) == (recipe.ARMS[r["arm"]]["family"] == "diffusion")
        assert r["lr"] == recipe.tuned_lr(records, r["arm"])
    full = next(r for r in runs if r["arm"] == "edm" and r["regime"] == "equal_steps")
    assert set(full["fd_posthoc"]) == {str(s) for s in recipe.POSTHOC_SIGMA_REL} and full["fd_no_ema"] > 0
    assert (tmp_path / "digits_edm.pt").exists() and (tmp_path / "digits_v.pt").exists()
    assert "FD 3 NFE" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--force"):
        recipe.main_recipe(quick=True, json_path=path, samples=60)


def test_the_shipped_full_run_has_every_planned_record():
    records = json.loads((DATA / "bench_recipe.json").read_text())
    tune = [r for r in records if r.get("regime") == "tune"]
    for arm in recipe.CHAIN:  # every chained recipe tuned on the same grid (extended only past an edge)
        rates = sorted(r["lr"] for r in tune if r["arm"] == arm)
        assert set(recipe.LRS) <= set(rates) and all(r["seed"] == recipe.TUNE_SEED for r in tune)
    runs = [r for r in records if r["kind"] == "run" and r["regime"] != "tune"]
    assert sorted((r["arm"], r["regime"], r["seed"]) for r in runs) == sorted(
        [(a, "equal_steps", s) for a in recipe.ARMS for s in recipe.SEEDS]
        + [("edm", "half_steps", s) for s in recipe.SEEDS])
    steps = preset("digits").steps
    assert all(r["steps"] == (steps // 2 if r["regime"] == "half_steps" else steps) and r["samples"] == 1000
               for r in runs)
    assert all(r["lr"] == recipe.tuned_lr(records, r["arm"]) for r in runs)
    assert all("fd_posthoc" in r for r in runs if r["arm"] == "edm" and r["regime"] == "equal_steps")
    assert records[0]["kind"] == "reference" and records[0]["samples"] == 297
