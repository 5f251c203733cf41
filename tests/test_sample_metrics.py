"""Distances between sample sets (issue 4) and the sampler benchmark, on data whose answer is known."""
import json
import math

import numpy as np
import pytest
import torch

from course_lib import metrics as M


def _gauss(n, d, seed, scale=1.0, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


def test_frechet_distance_matches_the_gaussian_formula():
    # N(0, I) vs N(m, s^2 I) in d dims: FD = |m|^2 + d (1 - s)^2 = 4 * 0.25 + 4 * 0.25 = 2
    a, b = _gauss(20_000, 4, 0), _gauss(20_000, 4, 1, scale=1.5, shift=0.5)
    assert M.frechet_distance(a, b) == pytest.approx(2.0, abs=0.08)  # estimator noise ~ 0.02 at n = 20,000
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert M.frechet_distance(a, _gauss(20_000, 4, 2)) < 0.01


def test_frechet_distance_agrees_with_scipys_matrix_root_and_stays_quiet_when_singular():
    import warnings

    from scipy import linalg  # the textbook formula, an independent computation

    for n, d, seed in ((2000, 8, 0), (300, 64, 1)):
        a, b = _gauss(n, d, seed), _gauss(n, d, seed + 10, scale=1.3, shift=0.2)
        c1, c2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
        want = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1) + np.trace(c2)
                     - 2 * np.trace(linalg.sqrtm(c1 @ c2).real))
        assert M.frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    # fewer samples than features: both covariances singular; a set against itself is at distance 0
    a, b = _gauss(40, 128, 3), _gauss(40, 128, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isfinite(M.frechet_distance(a, b)) and M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)  # round-off of a trace near 128


def test_sliced_wasserstein_of_a_shift():
    # SW2 between X and X + m in 2D is sqrt(E_theta (theta . m)^2) = |m| / sqrt(2)
    x = _gauss(3000, 2, 0)
    m = torch.tensor([0.6, -0.8], dtype=torch.float64)
    assert M.sliced_wasserstein(x, x + m, n_projections=2000) == pytest.approx(1 / math.sqrt(2), rel=0.05)
    assert M.sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_against_prdc_and_by_construction():
    prdc = pytest.importorskip("prdc")  # an independent implementation (Naeem et al. 2020), test-only
    real, fake = _gauss(600, 8, 0), _gauss(500, 8, 1, scale=1.4, shift=0.3)
    ours = M.precision_recall(real, fake, k=3)
    ref = prdc.compute_prdc(real.numpy(), fake.numpy(), nearest_k=3)
    assert ours["precision"] == pytest.approx(float(ref["precision"]), abs=1e-12)
    assert ours["recall"] == pytest.approx(float(ref["recall"]), abs=1e-12)
    # a collapsed generator: every fake sits on one real point: perfect precision, almost no recall
    collapsed = real[:1].repeat(50, 1) + 1e-3 * _gauss(50, 8, 2)
    pr = M.precision_recall(real, collapsed, k=3)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.05


def test_nearest_neighbours_against_sklearn_and_on_copies():
    from sklearn.neighbors import NearestNeighbors  # an independent implementation
    ref, q = _gauss(400, 64, 0).reshape(400, 1, 8, 8), _gauss(90, 64, 1).reshape(90, 1, 8, 8)
    dist, idx = M.nearest_neighbours(q, ref)
    d_sk, i_sk = NearestNeighbors(n_neighbors=1).fit(ref.reshape(400, -1).numpy()).kneighbors(q.reshape(90, -1).numpy())
    assert torch.equal(idx, torch.as_tensor(i_sk[:, 0])) and np.allclose(dist.numpy(), d_sk[:, 0], atol=1e-10)
    # exact copies are found at distance 0, at their own index
    pick = torch.tensor([5, 17, 399])
    dist, idx = M.nearest_neighbours(ref[pick] + 0.0, ref)
    assert torch.equal(idx, pick) and float(dist.max()) < 1e-12
    with pytest.raises(ValueError, match="same size"):
        M.nearest_neighbours(_gauss(3, 4, 0), _gauss(3, 5, 0))
    with pytest.raises(ValueError, match="finite"):
        M.nearest_neighbours(torch.full((2, 4), float("nan")), _gauss(3, 4, 0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        M.nearest_neighbours(np.zeros((2, 4)), _gauss(3, 4, 0))


def test_class_coverage_and_bad_input():
    assert M.class_coverage(torch.arange(100) % 10) == 10
    assert M.class_coverage(torch.zeros(100, dtype=torch.long)) == 1
    assert M.class_coverage(torch.tensor([0] * 96 + [1] * 4)) == 1  # 4% < half of a fair 10% share
    with pytest.raises(ValueError, match="class indices"):
        M.class_coverage(torch.tensor([10]))
    with pytest.raises(ValueError, match="same dimension"):
        M.frechet_distance(_gauss(10, 2, 0), _gauss(10, 3, 0))
    with pytest.raises(ValueError, match="non-finite"):
        M.sliced_wasserstein(torch.full((4, 2), float("nan")), _gauss(4, 2, 0))
    with pytest.raises(ValueError, match="k must be"):
        M.precision_recall(_gauss(5, 2, 0), _gauss(5, 2, 1), k=5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        M.frechet_distance(np.zeros((4, 2)), _gauss(4, 2, 0))


def test_bench_records_and_targets(tmp_path, capsys):
    from course_lib.bench import samplers as bench
    from course_lib.checkpoints import load_pretrained
    from course_lib.cli import main
    from course_lib.metrics import hq_fraction
    from course_lib.samplers import SAMPLERS, sample

    out = tmp_path / "b.json"
    default = bench.default_sampler("ring8")  # the card's choice at 10 NFE
    assert default == load_pretrained("ring8").card["recommended_sampler"]["10"]
    configs = [("ddpm", "uniform", 20), (default, "auto", 10), ("heun", "karras", 10),
               ("diffusers:dpmpp_2m", "karras", 10)]
    records = bench.bench_samplers(["ring8"], samples=300, seeds=(0, 1), configs=configs, progress=False)
    assert [r["nfe"] for r in records] == [20, 10, 9, 10] * 2  # counted: Heun spends 2 per step but the last
    assert [r["seed"] for r in records] == [0] * 4 + [1] * 4
    for r in records:
        assert {"dataset", "sampler", "spacing", "nfe", "seconds", "hq_fraction", "modes_covered", "swd"} <= set(r)
        assert 0 <= r["hq_fraction"] <= 1 and r["swd"] > 0 and r["seconds"] > 0
    # 'auto' is exactly what a learner's default call gives, on the same noise
    p = load_pretrained("ring8")
    z = torch.randn(300, 2, generator=torch.Generator().manual_seed(1))
    mine = sample(p.model, z, p.schedule, steps=10, generator=torch.Generator().manual_seed(2)).x  # seed 1's + 1
    from course_lib.data import ring_of_gaussians
    assert abs(hq_fraction(mine, ring_of_gaussians()) - records[5]["hq_fraction"]) < 1e-3
    # seeds are averaged, with their spread
    agg = bench.aggregate(records)
    assert len(agg) == 4 and all(r["seeds"] == 2 for r in agg) and bench.aggregate(agg) == agg
    pair = [r["hq_fraction"] for r in records if r["sampler"] == "heun"]
    assert agg[2]["hq_fraction"] == pytest.approx(sum(pair) / 2, abs=1e-4)
    assert agg[2]["hq_fraction_sd"] == pytest.approx(abs(pair[0] - pair[1]) / 2 ** 0.5, abs=1e-4)
    assert bench.reference(records, "ring8")["nfe"] == 20
    t = bench.targets(records)[0]  # the previous release's summary still works
    assert t["dataset"] == "ring8" and isinstance(t["met"], bool) and "hq" in t["detail"]
    assert t["default"].startswith(f"{default} (auto, 10 NFE)") and t["diffusers"].startswith("diffusers:dpmpp_2m")
    v = bench.verdicts(records)[0]  # what lesson 3 prints: one sentence from the aggregated numbers
    d, ref20 = v["default"], bench.reference(records, "ring8")
    assert v["matches_reference"] == bench.matches_reference(d, ref20) and d["sampler"] == default
    assert f"{d['hq_fraction']:.3f}" in v["sentence"] and f"{d['hq_fraction'] - ref20['hq_fraction']:+.3f}" in v["sentence"]
    assert "dpmpp_2m on karras levels" in v["sentence"] and "DDPM with 20 steps" in v["sentence"]
    assert "target" not in v["sentence"] and " met" not in v["sentence"]
    assert "dpmpp_2m" in bench.format_table(records) and "+-" in bench.format_table(records)
    fewest = bench.fewest_nfe(records, "ring8")
    assert set(fewest) == {(default, "auto"), ("heun", "karras"), ("diffusers:dpmpp_2m", "karras")}
    ref20 = bench.reference(records, "ring8")
    for r in bench.aggregate(records)[1:]:
        assert (fewest[(r["sampler"], r["spacing"])] == r["nfe"]) == bench.matches_reference(r, ref20)
    table = bench.fewest_table(records, "ring8").splitlines()
    assert "ddpm with 20 NFE" in table[0] and table[1].split() == ["karras", "auto"]
    spacings = table[1].split()
    width = len(table[1]) - 10 * len(spacings)
    for r in bench.aggregate(records)[1:]:  # each row shows its configuration's fewest NFE, or '-'
        row = next(line for line in table[2:] if line.split()[0] == r["sampler"])
        j = spacings.index(r["spacing"])
        assert row[width + 10 * j:width + 10 * (j + 1)].strip() == str(fewest[(r["sampler"], r["spacing"])] or "-")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    bench.plot_frontier(records, "ring8", ax)
    labels = ax.get_legend_handles_labels()[1]
    assert f"{default} (auto, the default call)" in labels and ax.get_xlabel()
    assert "diffusers: best scheduler and spacing per budget" in labels
    # 2D quality is drawn as 1 - hq: the default call's line passes through its aggregated value at 10 NFE
    line = next(ln for ln in ax.get_lines() if ln.get_label() == f"{default} (auto, the default call)")
    assert line.get_ydata()[list(line.get_xdata()).index(10)] == pytest.approx(1 - d["hq_fraction"])
    plt.close(fig)
    table = bench.pivot(records, "ring8", 10, "hq_fraction")
    assert "auto" in table and "karras" in table and "heun" in table
    with pytest.raises(ValueError, match="unknown metric"):
        bench.pivot(records, "ring8", 10, "fd")
    ref = {"dataset": "ring8", "hq_fraction": 0.97, "modes_covered": 8}
    assert bench.matches_reference({**ref, "hq_fraction": 0.93}, ref)
    assert not bench.matches_reference({**ref, "hq_fraction": 0.91}, ref)
    assert not bench.matches_reference({**ref, "modes_covered": 7}, ref)
    assert bench.matches_reference({"dataset": "digits", "fd": 10.9}, {"dataset": "digits", "fd": 10.0})
    assert not bench.matches_reference({"dataset": "digits", "fd": 11.1}, {"dataset": "digits", "fd": 10.0})
    # the grid: every sampler on every spacing at every budget, then diffusers; extra digits seeds repeat 10 NFE
    grid = bench.bench_configs(quick=True)
    assert grid[0] == ("ddpm", "uniform", 100)
    for name in SAMPLERS:
        assert {(name, sp, 10) for sp in bench.BENCH_SPACINGS} <= set(grid)
    assert ("diffusers:unipc", "karras", 20) in grid and ("diffusers:ddim", "karras", 10) not in grid
    spread = bench.spread_configs(bench.bench_configs(dataset="digits"))
    assert spread[0] == ("ddpm", "uniform", 1000) and {c[2] for c in spread[1:]} == {10}
    assert ("dpmpp_2m", "auto", 10) in spread and ("dpmpp_2m", "uniform", 10) not in spread
    assert ("diffusers:unipc", "karras", 10) in spread
    with pytest.raises(ValueError, match="unknown dataset"):
        bench.bench_configs(dataset="moons")
    # the command: refuses to overwrite, writes flat records, fails cleanly on bad input
    out.write_text("mine")
    assert main(["bench", "samplers", "--quick", "--json", str(out), "--datasets", "ring8"]) == 2
    assert out.read_text() == "mine"
    assert main(["bench", "samplers", "--datasets", "moons"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["bench", "samplers", "--quick", "--json", str(out), "--force", "--datasets", "ring8",
                 "--samples", "200"]) == 0
    saved = json.loads(out.read_text())
    assert len(saved) == len(bench.bench_configs(quick=True)) and all(r["dataset"] == "ring8" for r in saved)
    assert "target" in capsys.readouterr().out
    assert not bench.partial_path(out).exists()  # a finished run leaves only its JSON
    # a run that stopped: its saved records are kept as measured (not rerun), the rest are run, then FILE replaces
    # FILE.partial; an unfinished run is never silently restarted
    again = tmp_path / "again.json"
    bench.partial_path(again).write_text(json.dumps(saved[:-2]))
    assert main(["bench", "samplers", "--quick", "--json", str(again), "--datasets", "ring8",
                 "--samples", "200"]) == 2
    assert "--resume" in capsys.readouterr().err and not again.exists()
    assert main(["bench", "samplers", "--quick", "--json", str(again), "--resume", "--datasets", "ring8",
                 "--samples", "200"]) == 0
    assert f"{len(saved) - 2} records already measured" in capsys.readouterr().out
    resumed = json.loads(again.read_text())
    assert resumed[:-2] == saved[:-2] and [bench.record_key(r) for r in resumed] == [bench.record_key(r) for r in saved]
    assert not bench.partial_path(again).exists()
    assert main(["bench", "samplers", "--quick", "--resume"]) == 2
    assert "--json" in capsys.readouterr().err


def noise_fd_bound(judge, noise):
    """The FD of the starting noise itself (clipped to pixel range): any sampler that ran must land well below it."""
    return judge(noise.clamp(-1, 1))["fd"]


def test_bench_judges_digits_by_classifier_features():
    from course_lib.bench import samplers as bench
    from course_lib.data import digits_split

    judge = bench.Judge("digits", 100)
    real = judge(digits_split("test")[0][:200])
    noise = judge(torch.rand(200, 1, 8, 8) * 2 - 1)
    assert real["fd"] < noise["fd"] / 5 and real["precision"] > noise["precision"]
    assert real["class_coverage"] == 10
    # FD is biased upward at small n: the held-out floor is scored at its own size, and so are samples
    big = bench.Judge("digits", 600)(digits_split("train")[0][:600])
    assert "fd_at_test_n" in big and big["fd_at_test_n"] > big["fd"]
    # diffusers' Karras sigmas on the cosine schedule repeat t=999 at the start: the loop still takes every step
    from course_lib.checkpoints import load_pretrained
    noise = torch.randn(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    r = bench.run_diffusers(load_pretrained("digits"), "digits", "dpmpp_2m", "karras", 20, noise, judge)
    assert r["nfe"] == 20 and r["fd"] < noise_fd_bound(judge, noise)
    floor = judge.real_floor()
    assert floor["samples"] == 297 and floor["fd_at_test_n"] == floor["fd"]
    assert floor["fd_train_subset"] < floor["fd"]  # the training set's own images sit closer than new ones


def test_density_and_coverage_against_prdc_and_on_a_dropped_mode():
    prdc = pytest.importorskip("prdc")
    real, fake = _gauss(600, 8, 0), _gauss(500, 8, 1, scale=1.4, shift=0.3)
    ours, ref = M.density_coverage(real, fake, k=5), prdc.compute_prdc(real.numpy(), fake.numpy(), nearest_k=5)
    assert ours["density"] == pytest.approx(float(ref["density"]), abs=1e-12)
    assert ours["coverage"] == pytest.approx(float(ref["coverage"]), abs=1e-12)
    # two clusters of reals; fakes only from the first: coverage ~ 1/2 (half the real balls are empty) while density
    # stays ~ 1 (each fake sits among the reals as a real would); half the fakes far from every real: density ~ 1/2
    two = torch.cat([_gauss(1000, 2, 3), _gauss(1000, 2, 4, shift=20.0)])
    dc = M.density_coverage(two, _gauss(2000, 2, 5), k=5)
    assert 0.45 < dc["coverage"] <= 0.5 and 0.85 < dc["density"] < 1.15
    astray = M.density_coverage(two, torch.cat([_gauss(1000, 2, 8), _gauss(1000, 2, 9, shift=-50.0)]), k=5)
    assert 0.4 < astray["density"] < 0.6 and 0.45 < astray["coverage"] <= 0.5
    same = M.density_coverage(two, torch.cat([_gauss(1000, 2, 6), _gauss(1000, 2, 7, shift=20.0)]), k=5)
    assert same["coverage"] > 0.95 and 0.8 < same["density"] < 1.2
    with pytest.raises(ValueError, match="k must be"):
        M.density_coverage(real, fake, k=0)


def test_kid_against_torchmetrics_a_hand_sum_and_its_unbiasedness():
    from torchmetrics.image.kid import poly_mmd  # an independent implementation (equal set sizes)

    a, b = _gauss(300, 16, 0), _gauss(300, 16, 1, scale=1.2, shift=0.1)
    assert M.kid(a, b) == pytest.approx(float(poly_mmd(a, b)), rel=1e-10)
    # unequal sizes, by the definition's sums written out pair by pair
    x, y = _gauss(7, 3, 2), _gauss(5, 3, 3, shift=0.5)
    k = lambda u, v: (float(u @ v) / 3 + 1) ** 3
    want = (sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / 42
            + sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
            - 2 * sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / 35)
    assert M.kid(x, y) == pytest.approx(want, rel=1e-10)
    # two samples of one distribution: KID averages to 0 at n = 20 (FD's bias there is large), over 400 draws; the
    # standard error of the mean is std / 20
    kids = torch.tensor([M.kid(_gauss(20, 4, 2 * s + 100), _gauss(20, 4, 2 * s + 101)) for s in range(400)])
    assert abs(float(kids.mean())) < 3 * float(kids.std()) / 20
    # FD on the same draws is biased upwards: its mean sits many standard errors above 0
    fds = torch.tensor([M.frechet_distance(_gauss(20, 4, 2 * s + 100), _gauss(20, 4, 2 * s + 101)) for s in range(400)])
    assert float(fds.mean()) > 10 * float(fds.std()) / 20
