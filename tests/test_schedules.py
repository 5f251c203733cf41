import math
from pathlib import Path

import numpy as np
import pytest
import torch

from course_lib import schedules as S
from course_lib.schedules import NoiseSchedule

NAMES = sorted(S.SCHEDULES)


# linear at T=10 is invalid (betas scaled by 1000/T exceed 1) and is tested as refused in test_bad_inputs
@pytest.mark.parametrize("name, T", [(n, T) for n in NAMES for T in (10, 100, 1000) if (n, T) != ("linear", 10)])
def test_every_schedule_is_valid_and_alpha_bar_decreases(name, T):
    s = NoiseSchedule.named(name, T)
    assert s.T == T and s.betas.dtype == torch.float64
    assert ((s.betas > 0) & (s.betas < 1)).all()
    ab = s.alpha_bar
    assert (ab[1:] < ab[:-1]).all(), "alpha_bar must be strictly decreasing"
    assert 0 < ab[-1] < ab[0] < 1
    assert (s.log_snr[1:] < s.log_snr[:-1]).all()


def test_linear_golden_values_against_numpy():
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - betas)
    s = NoiseSchedule.named("linear", 1000)
    np.testing.assert_allclose(s.alpha_bar.numpy(), ab, rtol=1e-12)
    # the well-known terminal value: the linear schedule leaves sqrt(alpha_bar) ~ 0.0064 of the signal
    assert s.alpha_bar[-1].item() == pytest.approx(4.035e-5, rel=1e-3)


def test_cosine_matches_its_closed_form_where_not_clipped():
    T, s_ = 1000, 0.008
    sched = NoiseSchedule.named("cosine", T)
    u = torch.arange(1, T + 1, dtype=torch.float64) / T
    f = lambda v: torch.cos((v + s_) / (1 + s_) * math.pi / 2) ** 2
    want = f(u) / f(torch.zeros(1, dtype=torch.float64))
    unclipped = sched.betas < 0.999
    first_clip = int((~unclipped).nonzero()[0]) if (~unclipped).any() else T
    torch.testing.assert_close(sched.alpha_bar[:first_clip], want[:first_clip], rtol=1e-10, atol=1e-12)
    assert sched.betas.max() == pytest.approx(0.999)  # the paper's clip is reached at the very end


def test_sigmoid_and_scaled_linear_endpoints():
    sig = NoiseSchedule.named("sigmoid", 1000)
    assert sig.alpha_bar[0] > 0.999 and sig.alpha_bar[-1] < 1e-3
    sl = NoiseSchedule.named("scaled_linear", 1000)
    assert sl.betas[0].item() == pytest.approx(0.00085) and sl.betas[-1].item() == pytest.approx(0.012)


@pytest.mark.parametrize("name", NAMES)
def test_conversions_round_trip(name):
    s = NoiseSchedule.named(name, 1000)
    ab = s.alpha_bar
    torch.testing.assert_close(S.betas_from_alpha_bar(ab), s.betas, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(S.alpha_bar_from_log_snr(S.log_snr_from_alpha_bar(ab)), ab, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(S.alpha_bar_from_sigma(S.sigma_from_alpha_bar(ab)), ab, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(torch.log(s.snr), s.log_snr, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.sigmas**2, 1 / s.snr, rtol=1e-9, atol=0)  # sigma^2 = 1 / SNR


def test_known_points():
    ab = torch.tensor([0.5, 0.8], dtype=torch.float64)
    torch.testing.assert_close(S.snr_from_alpha_bar(ab), torch.tensor([1.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(S.sigma_from_alpha_bar(ab), torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(S.log_snr_from_alpha_bar(ab), torch.tensor([0.0, math.log(4)], dtype=torch.float64))


def test_at_gathers_and_broadcasts():
    s = NoiseSchedule.named("linear", 50)
    x = torch.zeros(3, 1, 4, 4)
    v = s.at(s.alpha_bar, torch.tensor([0, 10, 49]), x)
    assert v.shape == (3, 1, 1, 1) and v.dtype == torch.float32
    assert v[1].item() == pytest.approx(s.alpha_bar[10].item(), rel=1e-6)
    assert s.at(s.alpha_bar, 7, x).shape == ()


@pytest.mark.parametrize("bad, err, match", [
    (torch.tensor([0.1, 0.0]), ValueError, "strictly inside"),
    (torch.tensor([0.1, 1.0]), ValueError, "strictly inside"),
    (torch.tensor([0.1, -0.2]), ValueError, "strictly inside"),
    (torch.tensor([0.1, float("nan")]), ValueError, "NaN"),
    (torch.tensor([[0.1, 0.2]]), ValueError, "1-D"),
    (torch.tensor([], dtype=torch.float64), ValueError, "non-empty"),
    (torch.tensor([1, 2]), TypeError, "floating-point"),
    ([0.1, 0.2], TypeError, "torch.Tensor"),
])
def test_bad_betas(bad, err, match):
    with pytest.raises(err, match=match):
        NoiseSchedule(bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown schedule 'cosin'.*cosine"):
        S.make_betas("cosin")
    with pytest.raises(TypeError):
        S.make_betas(3)
    with pytest.raises(ValueError, match=">= 1"):
        S.linear_betas(0)
    with pytest.raises(TypeError, match="int"):
        S.cosine_betas(10.0)
    with pytest.raises(ValueError, match="strictly inside"):
        S.linear_betas(10)  # 1000/10 * 0.02 = 2: not a valid beta
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        S.snr_from_alpha_bar(torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match=">= 0"):
        S.alpha_bar_from_sigma(torch.tensor([-1.0]))
    s = NoiseSchedule.named("cosine", 100)
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        s.check_timesteps(torch.tensor([5, 100]))
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        s.check_timesteps(-1)
    with pytest.raises(TypeError, match="integers"):
        s.check_timesteps(torch.tensor([0.5]))
    with pytest.raises(TypeError):
        s.check_timesteps(True)
    with pytest.raises(TypeError):
        s.check_timesteps("3")
    with pytest.raises(ValueError, match="shape"):
        s.at(s.alpha_bar, torch.tensor([1, 2]), torch.zeros(3, 2))


def test_lesson_1_saved_schedule_table_is_what_the_library_prints_now():
    """Lesson 1 prints every schedule's repr; its saved output (what a learner reads on the web) must still be true."""
    import nbformat

    path = Path(__file__).resolve().parents[1] / "notebooks" / "01_forward_process.ipynb"
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and c.source.strip() == "for s in scheds.values():\n    print(s)"]
    assert len(cells) == 1, "lesson 1's cell that prints the schedules was not found"
    saved = "".join(o.get("text", "") for o in cells[0].outputs if o.output_type == "stream").strip().splitlines()
    now = [repr(NoiseSchedule.named(n, T=1000)) for n in S.SCHEDULES]
    assert saved == now
