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
    recs[3]["after_red_pixels"] = 0.01  # 20% of red left on seed 1: the mean 13% misses the 10% target
    assert not EV.verdict(recs)["esd_preserve_1_targets_met"]
    assert EV.verdict([]) == {}
    assert "0.0600 -> 0.0030" in EV.table(recs)


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
