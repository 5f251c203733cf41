"""Lesson 11's resolution benchmark: the shapes images at two resolutions, the arms' configs, the judge's input and the
verdict, checked against hand computations; one tiny run end to end; the shipped records' shape."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from course_lib.bench import resolution as R
from course_lib.data import DataSource, shapes_images
from course_lib.shapes import make_shapes

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "bench_resolution.json"


def test_shapes16_is_the_2x2_average_of_shapes32():
    big = make_shapes(6, "train", 3)[0]
    small = shapes_images(6, "shapes16", "train", 3)
    by_hand = big.reshape(6, 3, 16, 2, 16, 2).mean(dim=(3, 5))
    assert small.shape == (6, 3, 16, 16)
    torch.testing.assert_close(small, by_hand)
    torch.testing.assert_close(shapes_images(6, "shapes32", "train", 3), big)
    with pytest.raises(ValueError, match="shapes16"):
        shapes_images(4, "shapes8")


def test_data_source_serves_both_resolutions(monkeypatch):
    monkeypatch.setattr("course_lib.data.SHAPES_TRAIN", 64)  # the loop's 20,000 images take seconds to draw
    g = torch.Generator().manual_seed(0)
    for name, side in (("shapes32", 32), ("shapes16", 16)):
        src = DataSource(name)
        x, y = src.sample(5, g)
        assert src.shape == (3, side, side) and x.shape == (5, 3, side, side) and y is None
        assert x.min() >= -1 and x.max() <= 1


def test_sigma_data_is_the_training_images_std():
    for name, value in R.SHAPES_STD.items():
        std = float(shapes_images(4000, name).std())
        assert abs(std - value) < 0.01, (name, std)


def test_configs_differ_only_in_data_and_shift():
    a, b = R.train_config("shapes16", 1.0, 0), R.train_config("shapes32", 2.0, 0)
    assert (a.family, a.sigma_shift, b.sigma_shift, a.data, b.data) == ("edm", 1.0, 2.0, "shapes16", "shapes32")
    da, db = a.to_dict(), b.to_dict()
    assert {k for k in da if da[k] != db[k]} == {"data", "sigma_shift", "sigma_data"}
    with pytest.raises(ValueError, match="resolution"):
        R.train_config("digits", 1.0, 0)
    with pytest.raises(ValueError, match="shift"):
        R.train_config("shapes16", 0.0, 0)


def test_the_judge_sees_16x16_images_enlarged_by_repeating_pixels():
    x = torch.rand(3, 3, 16, 16) * 2.4 - 1.2
    out = R.to_judge(x)
    torch.testing.assert_close(out, F.interpolate(x.clamp(-1, 1), scale_factor=2, mode="nearest"))
    y = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(R.to_judge(y), y)


def _record(data, shift, seed, fd35):
    return {"kind": "run", "data": data, "shift": shift, "seed": seed, "steps": 10, "fd_10": fd35 + 1.0, "fd_35": fd35}


def test_verdict_ratios_by_hand():
    recs = [_record("shapes16", 1.0, s, v) for s, v in ((0, 10.0), (1, 12.0))]
    recs += [_record("shapes16", 2.0, s, v) for s, v in ((0, 11.0), (1, 13.0))]
    recs += [_record("shapes32", 1.0, s, v) for s, v in ((0, 20.0), (1, 22.0))]
    recs += [_record("shapes32", 2.0, s, v) for s, v in ((0, 15.0), (1, 18.0))]
    v = R.verdict(recs)
    assert math.isclose(v["shapes16_shift_ratio"], 24.0 / 22.0)
    assert math.isclose(v["shapes32_shift_ratio"], 33.0 / 42.0)
    assert v["shapes32_seed_ratios"] == [0.75, round(18 / 22, 3)]
    assert v["shift_helps_larger_more"] is True
    rows = {(r["data"], r["shift"]): r for r in R.summarize(recs)}
    assert math.isclose(rows[("shapes32", 2.0)]["fd_35_std"], math.sqrt(((15 - 16.5) ** 2 + (18 - 16.5) ** 2) / 1))


def test_one_tiny_run_end_to_end(monkeypatch):
    monkeypatch.setattr("course_lib.data.SHAPES_TRAIN", 256)
    rec = R.run_one("shapes16", 2.0, seed=0, n=50, quick=True)
    assert rec["steps"] == R.QUICK_STEPS and rec["shift"] == 2.0
    assert all(math.isfinite(rec[f"fd_{n}"]) and rec[f"fd_{n}"] > 0 for n in R.NFES)
    assert len(rec["mse_by_sigma"]) == len(R.LOSS_SIGMAS) and math.isfinite(rec["fd_real"])
    # 30 steps leave the model far from the data: its samples are much farther than real images are
    assert rec["fd_35"] > rec["fd_real"]


@pytest.mark.skipif(not SHIPPED.exists(), reason="the full run's records are not shipped")
def test_shipped_records_cover_every_arm_and_seed():
    recs = json.loads(SHIPPED.read_text())
    runs = [r for r in recs if r.get("kind") == "run"]
    assert {(r["data"], r["shift"], r["seed"]) for r in runs} == {
        (d, s, seed) for d in R.RESOLUTIONS for s in R.SHIFTS for seed in R.SEEDS}
    assert all(r["steps"] == R.STEPS and r["samples"] == 1000 for r in runs)
    assert set(R.verdict(recs)) >= {"shapes16_shift_ratio", "shapes32_shift_ratio", "shift_helps_larger_more"}
