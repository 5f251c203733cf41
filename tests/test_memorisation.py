"""Lesson 14's copy search (course_lib.memorisation) and its duplicated digits set, on planted copies whose answer is
known and against an independent nearest-neighbour search (scikit-learn)."""
import numpy as np
import pytest
import torch

from course_lib import memorisation as Mem
from course_lib.data import DUPLICATION, DataSource, digits_split, duplicated_digits


def _images(n, seed, shift=0.0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_the_duplicated_digits_set_repeats_each_distinct_digit_its_factor_times():
    rows = duplicated_digits()
    train, labels = digits_split("train")
    assert len(rows["distinct"]) == sum(DUPLICATION.values()) == len(set(rows["distinct_index"].tolist()))
    assert torch.equal(rows["distinct"], train[rows["distinct_index"]])  # distinct digits of the train split
    assert torch.equal(rows["images"], rows["distinct"][rows["source"]])
    assert torch.equal(rows["labels"], labels[rows["distinct_index"]][rows["source"]])
    counts = torch.bincount(rows["source"])
    assert torch.equal(counts, rows["distinct_factor"]) and torch.equal(rows["factor"], counts[rows["source"]])
    for f, k in DUPLICATION.items():
        assert int((rows["distinct_factor"] == f).sum()) == k
    assert torch.equal(duplicated_digits()["images"], rows["images"])  # a fixed draw
    batch, y = DataSource("digits_duplicated").sample(64, torch.Generator().manual_seed(0))
    assert batch.shape == (64, 1, 8, 8) and y.shape == (64,)


def test_the_threshold_is_the_held_out_quantile_of_an_independent_search():
    from sklearn.neighbors import NearestNeighbors

    train, held = _images(300, 0), _images(200, 1)
    d, _ = NearestNeighbors(n_neighbors=1).fit(train.reshape(300, -1).numpy()).kneighbors(held.reshape(200, -1).numpy())
    assert Mem.calibrate_threshold(train, held, 0.05) == pytest.approx(float(np.quantile(d[:, 0], 0.05)), rel=1e-9)
    with pytest.raises(ValueError, match="held-out images"):
        Mem.calibrate_threshold(train, held[:50], 0.01)
    with pytest.raises(ValueError, match="false_positive"):
        Mem.calibrate_threshold(train, held, 1.5)


def test_planted_copies_are_found_at_their_source_and_new_images_are_not():
    train, held = _images(400, 2), _images(200, 3)
    src = torch.tensor([3, 3, 50, 399, 120])
    planted = train[src] + 0.01 * _images(5, 4)  # near-copies (a little noise)
    samples = torch.cat([planted, _images(100, 5)])
    threshold = Mem.calibrate_threshold(train, held, 0.01)
    found = Mem.find_copies(samples, train, threshold)
    # new images are flagged at about the calibrated rate (1% of 100: at most 5 allowed, P(> 5) < 0.1%)
    assert found["copy"][:5].all() and int(found["copy"][5:].sum()) <= 5
    assert torch.equal(found["nearest"][:5], src)
    # in a feature space (a fixed projection): the same copies
    proj = torch.randn(64, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    feats = lambda x: x.reshape(len(x), -1) @ proj
    found_f = Mem.find_copies(samples, train, Mem.calibrate_threshold(train, held, 0.01, feats), feats)
    assert found_f["copy"][:5].all() and int(found_f["copy"][5:].sum()) <= 5
    with pytest.raises(ValueError, match="threshold"):
        Mem.find_copies(samples, train, 0.0)


def test_copy_rates_by_hand():
    # 4 distinct images: factors 1, 1, 10, 100; 8 samples: copies of image 2 (twice) and 3 (once), one near image 0
    # but not below the threshold, the rest new
    found = {"copy": torch.tensor([True, True, True, False, False, False, False, False]),
             "nearest": torch.tensor([2, 2, 3, 0, 1, 1, 0, 3])}
    rates = Mem.copy_rates(found, torch.tensor([1, 1, 10, 100]))
    assert rates["1"] == {"images": 2, "images_copied": 0.0, "per_image": 0.0, "samples": 0.0}
    assert rates["10"] == {"images": 1, "images_copied": 1.0, "per_image": 1000 * 2 / 8, "samples": 2 / 8}
    assert rates["100"] == {"images": 1, "images_copied": 1.0, "per_image": 1000 / 8, "samples": 1 / 8}
    assert rates["all"] == {"images": 4, "samples": 3 / 8}


def test_on_real_digits_training_digits_are_flagged_and_unseen_ones_at_the_calibrated_rate():
    # the held-out digits split in two: 150 calibrate the threshold at 5%, the other 147 are new digits the search must
    # mostly pass (binomial: 5% of 147 is 7.4, std 2.6; at most 20 allowed); training digits themselves are all flagged
    rows, held = duplicated_digits(), digits_split("test")[0]
    threshold = Mem.calibrate_threshold(rows["distinct"], held[:150], 0.05)
    assert Mem.find_copies(rows["distinct"][::7], rows["distinct"], threshold)["copy"].all()
    assert int(Mem.find_copies(held[150:], rows["distinct"], threshold)["copy"].sum()) <= 20


def test_measure_on_the_shipped_digits_model_keeps_its_closest_samples():
    from course_lib.checkpoints import load_pretrained

    p = load_pretrained("digits")
    train, held = digits_split("train")[0], digits_split("test")[0]
    rec = Mem.measure(p.model, p.schedule, 120, 5, train, torch.ones(len(train), dtype=torch.long), held)
    assert "features" not in rec and rec["pixels"]["1"]["images"] == len(train)
    close = rec["closest"]
    assert close["distance"] == sorted(close["distance"]) and len(close["samples"]) == Mem.SHOW
    # the kept distances are those of the kept pixels to the training images they name
    x = torch.tensor(close["samples"]).reshape(-1, 1, 8, 8)
    d = (x - train[close["nearest"]]).flatten(1).norm(dim=1)
    assert torch.allclose(d, torch.tensor(close["distance"]), atol=0.02)  # pixels rounded to 3 decimals
    assert rec["pixels"]["all"]["samples"] <= 0.1  # the shipped model flags few samples (1,500 digits, each once)


def test_the_flag_rate_interval_covers_the_true_rate_of_simulated_thresholds():
    """Held-out distances uniform on (0, 1): a threshold t flags new images at rate t exactly. Over 2,000 simulated
    calibrations on 297 held-out images (lesson 3's test split) the 90% interval must hold the true rate in 90% of them
    or a little more (it is widened to both interpolated order statistics); the standard error of a share near 0.9 at
    2,000 draws is 0.007, so [0.87, 0.97] fails only a wrong interval."""
    from course_lib.memorisation import flag_rate_interval

    lo, hi = flag_rate_interval(297, 0.01, 0.9)
    assert 0 < lo < 0.01 < hi < 0.04
    g = torch.Generator().manual_seed(0)
    rates = torch.stack([torch.quantile(torch.rand(297, generator=g, dtype=torch.float64), 0.01) for _ in range(2000)])
    covered = float(((rates >= lo) & (rates <= hi)).double().mean())
    assert 0.87 <= covered <= 0.97, covered
    wide = flag_rate_interval(297, 0.01, 0.99)
    assert wide[0] < lo and wide[1] > hi  # a higher level is a wider interval
    with pytest.raises(ValueError):
        flag_rate_interval(1)
