"""DDPM ancestral sampling against a Gaussian target whose exact model is known."""
import math

import pytest
import torch

from course_lib.analytic import gaussian_eps_model
from course_lib.samplers import check_timesteps, sample_ddpm, uniform_timesteps
from course_lib.schedules import NoiseSchedule

N = 10_000  # points of dimension 2: the sample variance has relative standard error sqrt(2 / 20,000) = 1%


def exact_model(schedule, sd):
    return gaussian_eps_model(schedule, sd)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("sd", [1.0, 0.5])
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_with_the_exact_model_samples_the_target(name, sd, variance):
    s = NoiseSchedule.named(name, 1000)
    g = torch.Generator().manual_seed(0)
    x = sample_ddpm(exact_model(s, sd), torch.randn(N, 2, generator=g, dtype=torch.float64), s,
                    variance=variance, generator=g)
    se_mean, se_var = sd / math.sqrt(2 * N), math.sqrt(2 / (2 * N))
    assert abs(x.mean().item()) < 5 * se_mean
    assert abs(x.var().item() / sd**2 - 1) < 5 * se_var


def test_respaced_ddpm_on_unit_gaussian_data_stays_exact():
    # for N(0, 1) data the respaced chain with beta_{t|s} = 1 - ab_t/ab_s is still the exact reverse process
    s = NoiseSchedule.named("linear", 1000)
    g = torch.Generator().manual_seed(1)
    x, traj = sample_ddpm(exact_model(s, 1.0), torch.randn(N, 2, generator=g, dtype=torch.float64), s,
                          uniform_timesteps(s, 50), generator=g, return_trajectory=True)
    assert traj.shape == (51, N, 2) and torch.equal(traj[-1], x)
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / (2 * N))


def test_the_wrong_model_misses_the_target():
    s = NoiseSchedule.named("linear", 1000)
    g = torch.Generator().manual_seed(2)
    x = sample_ddpm(exact_model(s, 1.0), torch.randn(N, 2, generator=g, dtype=torch.float64), s,
                    uniform_timesteps(s, 100), generator=g)
    assert abs(x.var().item() / 0.25 - 1) > 1  # a model of N(0, 1) does not sample N(0, 0.25)


def test_uniform_timesteps_and_validation():
    s = NoiseSchedule.named("cosine", 1000)
    assert uniform_timesteps(s, 5) == [999, 749, 500, 250, 0]
    assert uniform_timesteps(s, 1000) == list(range(999, -1, -1))
    assert check_timesteps(None, s) == list(range(999, -1, -1))
    for bad, msg in [([], "empty"), ([5, 9], "decreasing"), ([1000, 3], r"\[0, 999\]"), ([3, -1], r"\[0, 999\]")]:
        with pytest.raises(ValueError, match=msg):
            check_timesteps(bad, s)
    with pytest.raises(ValueError, match="int in"):
        uniform_timesteps(s, 0)
    with pytest.raises(ValueError, match="prediction"):
        sample_ddpm(lambda x, t: x, torch.zeros(2, 2), s)
    with pytest.raises(ValueError, match="variance"):
        sample_ddpm(exact_model(s, 1.0), torch.zeros(2, 2), s, variance="learned")
    with pytest.raises(ValueError, match="std must be > 0"):
        gaussian_eps_model(s, 0.0)
    torch.testing.assert_close(exact_model(s, 1.0)(torch.ones(3, 2), 5), exact_model(s, 1.0)(torch.ones(3, 2), torch.full((3,), 5)))
