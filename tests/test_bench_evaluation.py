"""Lesson 14's benchmark (course_lib.bench.evaluation): the erasure verdict by hand, tasks and records matched for
--resume, and the tables on records whose numbers are known."""
import math

import pytest

from course_lib.bench import evaluation as EV


def _erasure(seed, w, red_before, red_after, all_before, all_after):
    return {"section": "erasure", "seed": seed, "preserve_weight": w, "samples": 10, "train_minutes": 1.0,
            "trainable": 5, "before_red_pixels": red_before, "after_red_pixels": red_after,
            "before_read_as_concept": 1.0, "after_read_as_concept": 0.1, "before_other_all": all_before,
            "after_other_all": all_after}


def test_the_erasure_verdict_by_hand():
    recs = [_erasure(0, 0.0, 0.06, 0.003, 1.0, 0.40), _erasure(1, 0.0, 0.05, 0.004, 0.98, 0.30),
            _erasure(0, 1.0, 0.06, 0.004, 1.0, 0.99), _erasure(1, 1.0, 0.05, 0.006, 0.98, 0.95)]
    v = EV.verdict(recs)
    assert math.isclose(v["esd_red_left"], (0.003 / 0.06 + 0.004 / 0.05) / 2)
    assert math.isclose(v["esd_other_drop"], (0.60 + 0.68) / 2) and not v["esd_targets_met"]
    assert math.isclose(v["esd_preserve_1_red_left"], (0.004 / 0.06 + 0.006 / 0.05) / 2)  # 0.093
    assert math.isclose(v["esd_preserve_1_other_drop"], (0.01 + 0.03) / 2) and v["esd_preserve_1_targets_met"]
    assert v["esd_recommended_weight"] == 1.0  # the only weight within both targets
    more = recs + [_erasure(0, 5.0, 0.06, 0.003, 1.0, 1.0), _erasure(1, 5.0, 0.05, 0.004, 0.98, 0.98),
                   _erasure(0, 2.0, 0.06, 0.001, 1.0, 1.0), _erasure(1, 2.0, 0.05, 0.001, 0.98, 0.98)]
    assert EV.verdict(more)["esd_recommended_weight"] == 2.0  # no drop at 2 and 5; 2 leaves less red
    recs[3]["after_red_pixels"] = 0.01  # 20% of red left on seed 1: the mean 13% misses the 10% target
    assert not EV.verdict(recs)["esd_preserve_1_targets_met"]
    assert "esd_recommended_weight" not in EV.verdict(recs)  # no weight within both targets: no recommendation
    assert EV.verdict([]) == {}
    rows = {r["preserve_weight"]: r for r in EV.summarize_erasure(recs)}
    assert math.isclose(rows[0.0]["other_drop"], 0.64) and math.isclose(rows[0.0]["other_drop_std"], 0.08 / 2 ** 0.5)
    assert "preserve 0: red pixels left 0.065" in EV.table(recs, "erasure") and EV.table(recs, "bias") == ""
    with pytest.raises(ValueError, match="unknown sections"):
        EV.table(recs, "nonsense")


def test_the_memorisation_summary_by_hand():
    def rec(seed, steps, x100):
        rates = {"1": {"samples": 0.01, "images_copied": 0.02}, "10": {"samples": 0.02, "images_copied": 0.5},
                 "100": {"samples": x100, "images_copied": 1.0}, "all": {"samples": 0.03 + x100}}
        return {"section": "memorisation", "seed": seed, "steps": steps, "pixels": rates}
    rows = EV.summarize_memorisation([rec(0, 1000, 0.1), rec(1, 1000, 0.3), rec(0, 4000, 0.5)])
    top = {(r["steps"], r["factor"]): r for r in rows}
    assert [(r["steps"], r["factor"]) for r in rows] == [(1000, 1), (1000, 10), (1000, 100), (4000, 1), (4000, 10),
                                                         (4000, 100)]
    assert math.isclose(top[(1000, 100)]["samples"], 0.2) and top[(1000, 100)]["seeds"] == 2
    assert math.isclose(top[(1000, 100)]["samples_std"], math.sqrt(0.02))  # (0.1^2 + 0.1^2) / (2 - 1)
    assert top[(4000, 100)]["samples_std"] == 0.0


def test_every_task_has_the_key_of_its_records():
    tasks = EV.tasks_for((0, 1), 12, quick=True)
    keys = [EV._key(t) for t in tasks]
    assert len(set(keys)) == len(keys)  # no two tasks share a key
    records = {"metrics": {"section": "metrics", "kind": "bias", "resample": 0},
               "shipped": {"section": "shipped", "name": "digits", "seed": 0},
               "alignment": {"section": "alignment", "seed": 0, "scale": 3.0},
               "erasure": {"section": "erasure", "seed": 1, "preserve_weight": 1.0},
               "memorisation": {"section": "memorisation", "seed": 1, "steps": 10}}
    for section, rec in records.items():
        assert EV._key([rec]) in keys, section
    with pytest.raises(ValueError, match="unknown section"):
        EV.run_one("nonsense")


def test_a_stopped_memorisation_run_continues_to_the_same_records(tmp_path, monkeypatch):
    import course_lib.bench as bench_pkg

    monkeypatch.setattr(bench_pkg, "SAVE_EVERY", 3)
    whole = EV._memorisation(0, (4, 8), 60, True, None)
    real, count = bench_pkg.save_run, [0]

    class Stop(Exception):
        pass

    def save_then_stop(trainer, path, **extra):  # saves at step 3, at 4 (with the first record), then 6: stop there
        real(trainer, path, **extra)
        count[0] += 1
        if count[0] == 3:
            raise Stop

    ckpt = tmp_path / "memorisation_seed0.pt"
    with monkeypatch.context() as m:
        m.setattr(bench_pkg, "save_run", save_then_stop)
        with pytest.raises(Stop):
            EV._memorisation(0, (4, 8), 60, True, str(ckpt))
    resumed = EV._memorisation(0, (4, 8), 60, True, str(ckpt))
    assert [r["steps"] for r in resumed] == [4, 8]
    for a, b in zip(whole, resumed):
        assert a["pixels"] == b["pixels"] and a["features"] == b["features"] and a["closest"] == b["closest"]


def test_erase_defaults_to_the_shipped_benchmarks_recommendation():
    """A default a learner gets is the one lesson 14 recommends: the preservation weight that the shipped records'
    verdict picks, and the number of steps those records were measured at."""
    from course_lib.checkpoints import shipped_json
    from course_lib.erasure import EraseConfig

    records = shipped_json("bench_evaluation.json")
    erasure = [r for r in records if r["section"] == "erasure"]
    assert erasure and {r["steps"] for r in erasure} == {EraseConfig().steps}
    assert EV.verdict(records)["esd_recommended_weight"] == EraseConfig().preserve_weight
