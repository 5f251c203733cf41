"""Lesson 8's benchmark (course_lib.bench.arch): DiT vs UNet on digits, run end to end on a tiny budget, and the
shipped full run's records."""
import json
import statistics
from pathlib import Path

import pytest
import torch

from course_lib.bench import arch
from course_lib.nets import DiT, UNet
from course_lib.nets.dit import dit_flops

DATA = Path(__file__).resolve().parents[1] / "data"


def _net(name):
    cfg = {k: v for k, v in arch.arch_config(name).items() if k != "kind"}
    return UNet(**cfg) if name == "unet" else DiT(**cfg)


def test_the_matched_dit_has_the_unets_parameter_count_and_flops_are_counted_with_attention():
    n = {name: sum(p.numel() for p in _net(name).parameters()) for name in arch.ARCHS}
    assert abs(n[arch.MATCHED] - n["unet"]) / n["unet"] < 0.10  # matched within 10%
    assert n["dit_s2"] < n["dit_m2"] < n["dit_l2"]
    for name in ("dit_m2", "dit_m1"):  # the counter sees attention: it agrees with the hand count of dit_flops
        net = _net(name)
        cfg, d = net.config, net.config["hidden"]
        tokens = (8 // cfg["patch"]) ** 2
        left_out = 2 * tokens * cfg["patch"] ** 2 * d + 2 * (256 * d + d * d)  # patch embedding, time MLP
        # in eval mode too, where nn.MultiheadAttention's fused path would hide attention from the counter
        assert arch.forward_flops(net.eval()) == arch.forward_flops(net.train()) == dit_flops(cfg) + left_out
    assert arch.forward_flops(_net("dit_m1")) > 4 * arch.forward_flops(_net("dit_m2"))
    with pytest.raises(ValueError, match="unknown architecture"):
        arch.arch_config("vit")


def test_summary_and_verdict_are_means_and_spreads_over_seeds():
    runs = [{"kind": "run", "arch": a, "regime": "equal_steps", "seed": s, "parameters": 1, "steps": 10,
             "train_flops": 1, "fd": fd, "precision": 0.5, "recall": 0.5, "train_seconds": 1.0, "ms_per_sample": 1.0}
            for a, fds in (("unet", (10.0, 12.0, 11.0)), (arch.MATCHED, (12.0, 13.0, 14.5))) for s, fd in enumerate(fds)]
    v = arch.verdict(runs)
    assert v["unet_fd"] == pytest.approx(11.0) and v["dit_fd"] == pytest.approx(statistics.mean((12, 13, 14.5)))
    assert v["dit_fd_std"] == pytest.approx(statistics.stdev((12, 13, 14.5)))
    assert v["ratio"] == pytest.approx(v["dit_fd"] / 11.0) and v["within"] is (v["ratio"] <= 1.15)
    assert v["winner"] == "unet" and "equal_time_fd" not in v
    # 11 +- 1 against 13.17 +- 1.26: 2.17 apart, less than the spreads' sum 2.26, so not separated by the seeds
    assert v["separated"] is False
    far = [dict(r, fd=r["fd"] + 5.0) if r["arch"] == arch.MATCHED else r for r in runs]
    assert arch.verdict(far)["separated"] is True
    with pytest.raises(ValueError, match="no equal-steps runs"):
        arch.verdict(runs[:3])


def _check_tuning(records, tune, start):
    # every architecture tried the starting grid; the grid grew only past an edge where the best sat, until the best
    # was inside it or the extensions ran out
    for a in ("unet", arch.MATCHED):
        lrs = sorted(r["lr"] for r in tune if r["arch"] == a)
        assert set(start) <= set(lrs) and len(lrs) == len(set(lrs)) <= len(start) + arch.MAX_EXTENSIONS
        best = arch.tuned_lr(records, a)
        assert best not in (lrs[0], lrs[-1]) or len(lrs) == len(start) + arch.MAX_EXTENSIONS


def test_the_grid_extends_only_past_the_edge_where_the_best_rate_sits():
    assert arch._extend([3e-4, 1e-3, 3e-3], 3e-3) == 1e-2 and arch._extend([3e-4, 1e-3, 3e-3], 3e-4) == 1e-4
    assert arch._extend([3e-4, 1e-3, 3e-3], 1e-3) is None
    assert arch._extend(list(arch.LADDER[-3:]), arch.LADDER[-1]) is None  # the ladder's end


def test_the_benchmark_runs_end_to_end_and_never_overwrites(tmp_path, monkeypatch, capsys):
    from course_lib.bench import compare

    monkeypatch.setitem(compare.QUICK_BUDGET, "digits", dict(steps=4, batch_size=16))
    path = tmp_path / "arch.json"
    records = arch.main_arch(quick=True, json_path=path, samples=60)
    assert json.loads(path.read_text()) == records
    runs = [r for r in records if r["kind"] == "run" and r["regime"] != "tune"]
    assert [(r["arch"], r["regime"], r["seed"]) for r in runs] == arch.plan(quick=True)
    tune = [r for r in records if r.get("regime") == "tune"]
    _check_tuning(records, tune, arch.QUICK_LRS)
    for r in runs:  # every comparison run trains at its family's best tuning rate
        best = min((t for t in tune if t["arch"] == ("unet" if r["arch"] == "unet" else arch.MATCHED)),
                   key=lambda t: t["fd"])
        assert r["lr"] == best["lr"]
    for r in runs:
        assert r["samples"] == 60 and r["fd"] > 0 and 0 <= r["precision"] <= 1 and r["nfe"] == 20
        assert r["train_flops"] == 3 * r["forward_flops"] * r["steps"] * r["batch_size"]
        assert r["steps"] == (4 if r["regime"] == "equal_steps" else r["steps"])
    timed = next(r for r in runs if r["regime"] == "equal_time")
    t = timed["timed_seconds_per_step"]
    assert timed["steps"] == max(1, round(4 * t["unet"] / t[arch.MATCHED]))
    assert records[0]["kind"] == "reference" and records[0]["fd"] > 0
    assert "held-out real digits" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--force"):
        arch.main_arch(quick=True, json_path=path, samples=60)


def test_the_shipped_full_run_has_every_planned_record():
    records = json.loads((DATA / "bench_arch.json").read_text())
    runs = [r for r in records if r["kind"] == "run" and r["regime"] != "tune"]
    assert sorted((r["arch"], r["regime"], r["seed"]) for r in runs) == sorted(arch.plan(quick=False))
    _check_tuning(records, [r for r in records if r.get("regime") == "tune"], arch.LRS)
    assert all(r["steps"] == 2000 and r["samples"] == 1000 for r in runs if r["regime"] == "equal_steps")
    v = arch.verdict(records)
    assert v["seeds"] == len(arch.SEEDS) and v["ratio"] > 0
    assert records[0]["kind"] == "reference" and records[0]["samples"] == 297  # the held-out digits
    with torch.no_grad():
        assert all(torch.isfinite(torch.tensor([r["fd"], r["precision"], r["recall"]])).all() for r in runs)


def test_the_shipped_flops_count_attention_as_the_benchmark_counts_it_now(tmp_path):
    """Every run's FLOPs in the shipped file are those of its architecture's model, attention included; a file written
    with the eval-mode count that missed attention is brought back in line by recount_flops."""
    from course_lib.nets import DiT

    records = json.loads((DATA / "bench_arch.json").read_text())
    for r in (r for r in records if r["kind"] == "run"):
        cfg = {k: v for k, v in arch.arch_config(r["arch"]).items() if k != "kind"}
        net = (UNet if r["arch"] == "unet" else DiT)(**cfg).eval()
        assert r["forward_flops"] == arch.forward_flops(net), r["arch"]
        assert r["train_flops"] == 3 * r["forward_flops"] * r["steps"] * r["batch_size"]
    stale = [dict(r, forward_flops=1, train_flops=1) if r["kind"] == "run" else r for r in records]
    path = tmp_path / "stale.json"
    path.write_text(json.dumps(stale))
    assert arch.recount_flops(path) == records
