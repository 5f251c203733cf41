"""Lesson 14's measurements of how the metrics behave (course_lib.metric_behaviour): the degradations against scipy and
by construction, and the bias curves' known shape (FD falls with n between two sets of real digits; KID stays at 0)."""
import pytest
import torch

from course_lib import metric_behaviour as MB


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5])
def test_blur_matches_scipys_gaussian_filter(sigma):
    from scipy.ndimage import gaussian_filter  # an independent implementation (edges: 'nearest' = replicate)

    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    want = torch.stack([torch.from_numpy(gaussian_filter(img[0].numpy(), sigma, mode="nearest", truncate=3.0))
                        for img in x])[:, None]
    assert torch.allclose(MB.blur(x, sigma), want, atol=1e-12)
    assert torch.equal(MB.blur(x, 0.0), x)


def test_degradations_by_construction():
    labels = torch.arange(10).repeat(60)
    images = labels.double().view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()  # each image is its label, everywhere
    kept = MB.degrade(images, labels, "drop", 3, 300, seed=1)
    values = set(kept[:, 0, 0, 0].tolist())
    assert len(kept) == 300 and len(values) == 7  # three of the ten classes gone, the seven others all there
    assert MB.degrade(images, labels, "drop", 3, 300, seed=1).equal(kept)  # seeded
    x = torch.zeros(500, 1, 8, 8)
    noisy = MB.degrade(x, labels[:500], "noise", 0.2, 500, seed=2)
    assert float(noisy.std()) == pytest.approx(0.2, rel=0.05)  # 32,000 draws: std's error ~0.4%
    with pytest.raises(ValueError, match="candidates"):
        MB.degrade(images, labels, "drop", 9, 100, seed=0)
    with pytest.raises(ValueError, match="kind"):
        MB.degrade(images, labels, "rotate", 1, 10, seed=0)


def test_bias_curves_fd_falls_with_n_and_kid_stays_near_zero():
    pixels = {"pixels": lambda x: x.reshape(len(x), -1).double()}
    rows = MB.bias_curves(ns=(25, 100, 400), resamples=3, features=pixels)
    fd = {n: sum(r["fd"] for r in rows if r["n"] == n) / 3 for n in (25, 100, 400)}
    assert fd[25] > 2 * fd[100] > 4 * fd[400] > 0  # FD's bias shrinks about as 1 / n between real sets
    kid = torch.tensor([r["kid"] for r in rows])
    assert abs(float(kid.mean())) < 0.02 and float(kid.abs().max()) < 0.1  # pixel KIDs of degraded sets: 0.03-0.5
    with pytest.raises(ValueError, match="disjoint"):
        MB.bias_curves(ns=(900,), resamples=1, features=pixels)


def test_each_resampling_is_its_own_draw():
    pixels = {"pixels": lambda x: x.reshape(len(x), -1).double()}
    two = MB.bias_curves(ns=(50,), resamples=2, features=pixels)
    assert two[0]["fd"] != two[1]["fd"] and [r["resample"] for r in two] == [0, 1]
    second = MB.bias_curves(ns=(50,), resamples=1, features=pixels, first=1)
    assert second[0]["fd"] == two[1]["fd"] and second[0]["resample"] == 1  # resampling 1 alone is the same draw
