"""bench bf16: the verdict rule on records, and the CPU's bf16 detection the Trainer's default follows."""
import pytest
import torch

from course_lib import runtime
from course_lib.bench import precision as P


def _rec(dataset, seed, dtype, value, ms):
    metric = P.METRIC[dataset][0]
    return {"dataset": dataset, "seed": seed, "dtype": dtype, metric: value, "ms_per_step": ms}


def test_bf16_passes_only_within_fp32_s_seed_spread():
    fp32 = [14.0, 16.0, 15.0]
    records = [_rec("digits", s, "fp32", v, 60.0) for s, v in enumerate(fp32)]
    ok = P.verdict(records + [_rec("digits", s, "bf16", v, 40.0) for s, v in enumerate([15.5, 16.2, 15.9])], "digits")
    assert ok["bf16_ok"] and ok["fp32_range"] == [14.0, 16.0]
    assert ok["paired_differences"] == [1.5, 0.2, 0.9]
    bad = P.verdict(records + [_rec("digits", s, "bf16", v, 40.0) for s, v in enumerate([16.5, 16.9, 17.2])], "digits")
    assert not bad["bf16_ok"] and "keep fp32" in P.describe(bad)
    better = P.verdict(records + [_rec("digits", s, "bf16", v, 40.0) for s, v in enumerate([9.0, 9.5, 9.9])],
                       "digits")
    assert better["bf16_ok"]  # better than fp32 is within the rule (lower FD is better)


def test_the_cpu_s_bf16_support_is_a_bool_and_matches_its_flags():
    has = runtime.cpu_has_bf16()
    assert isinstance(has, bool)
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert has
    elif "avx512" not in flags and torch.backends.cpu.get_cpu_capability() != "AVX512":
        assert not has


def test_one_run_of_each_precision_trains_from_the_same_start():
    a = P.train_one("ring8", 0, "fp32", quick=True, samples=100)
    b = P.train_one("ring8", 0, "bf16", quick=True, samples=100)
    assert a["steps"] == b["steps"] == P.QUICK_STEPS["ring8"]
    # the same seed, batches and noise: the losses agree to within bf16's rounding
    assert abs(a["final_loss"] - b["final_loss"]) < 0.02 * a["final_loss"]


def test_the_trainer_uses_bf16_on_a_cpu_only_where_it_is_native_and_fp32_when_asked(monkeypatch):
    from course_lib.train import Trainer, preset

    monkeypatch.delenv("COURSE_PRECISION", raising=False)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.autocast_dtype("cpu") == torch.bfloat16
    assert Trainer(preset("ring8", steps=2), "cpu").amp_dtype == torch.bfloat16
    assert Trainer(preset("ring8", steps=2, amp=False), "cpu").amp_dtype is None
    monkeypatch.setenv("COURSE_PRECISION", "fp32")
    assert runtime.autocast_dtype("cpu") is None and Trainer(preset("ring8", steps=2), "cpu").amp_dtype is None
    monkeypatch.setenv("COURSE_PRECISION", "half")
    with pytest.raises(ValueError, match="COURSE_PRECISION"):
        runtime.autocast_dtype("cpu")
    monkeypatch.delenv("COURSE_PRECISION")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert runtime.autocast_dtype("cpu") is None and runtime.autocast_dtype("mps") is None
