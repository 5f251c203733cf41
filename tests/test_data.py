import gzip
import hashlib
import http.server
import math
import struct
import threading
from functools import partial

import numpy as np
import pytest
import torch

from course_lib import data
from course_lib.metrics import (
    hq_fraction,
    hq_fraction_expected,
    mode_counts,
    modes_covered,
)


@pytest.mark.parametrize("mixture, k", [(data.ring_of_gaussians(), 8), (data.grid_of_gaussians(), 25)])
def test_exact_samples_score_as_theory_says(mixture, k):
    n = 50_000
    x, labels = mixture.sample(n, torch.Generator().manual_seed(0), return_labels=True)
    assert x.shape == (n, 2) and len(mixture.modes) == k
    # P(|z| <= 3) = 1 - exp(-4.5) = 0.98889 for a 2D Gaussian; binomial SE sqrt(p(1-p)/n) ~ 4.7e-4
    p = hq_fraction_expected(3.0)
    assert p == pytest.approx(0.98889, abs=1e-5)
    assert abs(hq_fraction(x, mixture) - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert modes_covered(x, mixture) == k
    # each mode gets its share: counts ~ Binomial(n, p/k), within 5 SE
    counts = mode_counts(x, mixture).double()
    share = n * p / k
    assert (counts - share).abs().max() < 5 * math.sqrt(share)
    assert torch.bincount(labels, minlength=k).min() > 0


def test_one_mode_only_covers_one_mode():
    ring = data.ring_of_gaussians()
    x = ring.modes[3] + ring.std * torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    assert modes_covered(x, ring) == 1
    assert hq_fraction(x, ring) > 0.97


def test_points_between_modes_are_not_high_quality():
    grid = data.grid_of_gaussians()
    between = grid.modes[:5] + torch.tensor([0.25, 0.0])  # halfway between neighbours: 5 std away
    assert hq_fraction(between, grid) == 0.0 and modes_covered(between, grid) == 0


def test_metrics_reject_bad_input():
    ring = data.ring_of_gaussians()
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        hq_fraction(torch.zeros(5, 3), ring)
    with pytest.raises(ValueError, match="non-finite"):
        hq_fraction(torch.tensor([[0.0, float("nan")]]), ring)
    with pytest.raises(TypeError):
        hq_fraction(np.zeros((4, 2)), ring)


@pytest.mark.parametrize("name", sorted(data.TOY_2D))
def test_every_2d_dataset_is_seeded_and_bounded(name):
    a = data.sample_2d(name, 2000, torch.Generator().manual_seed(5))
    b = data.sample_2d(name, 2000, torch.Generator().manual_seed(5))
    assert a.shape == (2000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.abs().max() < 2.0 and a.std(0).min() > 0.2


def test_checkerboard_lies_on_dark_squares():
    x = data.checkerboard(5000, squares=4, generator=torch.Generator().manual_seed(0))
    cell = ((x + 1) / 0.5).floor().long().clamp(0, 3)
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()


def test_bad_2d_requests():
    with pytest.raises(ValueError, match="unknown 2D dataset"):
        data.sample_2d("spiral", 10)
    with pytest.raises(ValueError, match=">= 1"):
        data.ring_of_gaussians().sample(0)
    with pytest.raises(TypeError):
        data.two_moons(10.5)


def test_digits_offline():
    x, y = data.load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))


# ---- MNIST: the real download code, served from loopback, on small IDX files written here ----

def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_mnist_like(folder, n=7, prefix="train"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    return images, labels


@pytest.fixture
def idx_server(tmp_path):
    served = tmp_path / "mirror"
    images, labels = _write_mnist_like(served)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", images, labels, served
    server.shutdown()


def test_mnist_download_parse_and_cache(idx_server, tmp_path):
    url, images, labels, _ = idx_server
    root = tmp_path / "cache"
    x, y = data.load_mnist("mnist", "train", root=root, base_url=url)
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    np.testing.assert_allclose(x[:, 0].numpy(), images / 127.5 - 1, atol=1e-6)
    assert y.tolist() == labels.tolist()
    assert sorted(p.name for p in root.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    # cached: a second call works with no server at all
    x2, _ = data.load_mnist("mnist", "train", root=root, download=False)
    assert torch.equal(x, x2)


def test_checksum_mismatch_leaves_no_file(idx_server, tmp_path, monkeypatch):
    url, *_ = idx_server
    root = tmp_path / "cache"
    bad = {"train-images-idx3-ubyte.gz": "0" * 32, "train-labels-idx1-ubyte.gz": "0" * 32}
    monkeypatch.setitem(data.MNIST_SOURCES, "mnist", (url, bad))  # the official path, wrong checksums
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        data.load_mnist("mnist", "train", root=root)
    assert list(root.iterdir()) == []  # no half-written or corrupt file left behind


def test_official_checksums_are_checked(idx_server, tmp_path, monkeypatch):
    url, _, _, served = idx_server
    good = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
    monkeypatch.setitem(data.MNIST_SOURCES, "fashion", (url, good))
    x, y = data.load_mnist("fashion", "train", root=tmp_path / "f")
    assert len(x) == len(y) == 7


def test_offline_message_says_what_to_do(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on: connection refused, like being offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match="offline.*load_digits"):
        data.load_mnist("mnist", "test", root=tmp_path, base_url=f"http://127.0.0.1:{port}/", timeout=5)
    with pytest.raises(FileNotFoundError, match="download=False"):
        data.load_mnist("mnist", "test", root=tmp_path, download=False)


def test_bad_mnist_arguments_and_files(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        data.load_mnist("cifar")
    with pytest.raises(ValueError, match="split"):
        data.load_mnist("mnist", "val")
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(_idx_bytes(np.zeros((3, 4, 4), np.uint8))[:-5])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(p)
    p.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(p)


def test_data_home_env(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path))
    assert data.data_home() == tmp_path


def test_mode_recovery_accuracy_from_perfect_to_chance():
    from course_lib.metrics import mode_recovery_accuracy

    ring, n = data.ring_of_gaussians(), 40_000
    g = torch.Generator().manual_seed(3)
    x, y = ring.sample(n, g, return_labels=True)
    assert mode_recovery_accuracy(x, y, ring, 1.0) == 1.0  # modes 0.77 apart, 15 std: never confused
    ab = 1e-6  # essentially pure noise: accuracy is chance, 1/8, within 5 binomial SE
    xt = ab**0.5 * x + (1 - ab) ** 0.5 * torch.randn(n, 2, generator=g)
    assert abs(mode_recovery_accuracy(xt, y, ring, ab) - 1 / 8) < 5 * math.sqrt((1 / 8) * (7 / 8) / n)
    # in between it agrees with a Monte Carlo estimate of the same Bayes rule computed another way
    ab = 0.3
    xt = ab**0.5 * x + (1 - ab) ** 0.5 * torch.randn(n, 2, generator=g)
    var = ab * ring.std**2 + 1 - ab
    loglik = -((xt[:, None, :] - ab**0.5 * ring.modes[None]) ** 2).sum(-1) / (2 * var)
    want = float((loglik.argmax(1) == y).float().mean())
    assert mode_recovery_accuracy(xt, y, ring, ab) == pytest.approx(want, abs=1e-12)
    assert 0.2 < want < 0.9
    with pytest.raises(ValueError):
        mode_recovery_accuracy(xt, y[:-1], ring, ab)
    with pytest.raises(ValueError):
        mode_recovery_accuracy(xt, y, ring, 0.0)


def test_mixture_log_prob_is_a_normalised_density_and_matches_its_entropy():
    from course_lib.data import grid_of_gaussians, ring_of_gaussians

    ring = ring_of_gaussians()
    u = torch.linspace(-1.5, 1.5, 1201, dtype=torch.float64)
    xx, yy = torch.meshgrid(u, u, indexing="ij")
    mass = ring.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp().sum().item() * (u[1] - u[0]).item() ** 2
    assert mass == pytest.approx(1.0, abs=1e-3)
    # well-separated modes: entropy = log K + log(2 pi e std^2); a Monte Carlo estimate, 5 standard errors
    g = torch.Generator().manual_seed(0)
    for mix in (ring, grid_of_gaussians()):
        lp = mix.log_prob(mix.sample(20_000, g))
        h = math.log(len(mix.modes)) + math.log(2 * math.pi * math.e * mix.std**2)
        assert abs(-lp.mean().item() - h) < 5 * lp.std().item() / math.sqrt(20_000)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        ring.log_prob(torch.zeros(3))
