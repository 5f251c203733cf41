"""The forward process against its formulas.

Tolerances: with N independent samples the standard error of a mean is std/sqrt(N) and of a variance
var*sqrt(2/(N-1)); every check allows 5 standard errors (a false alarm about once in 1.7 million).
"""
import math

import pytest
import torch

from course_lib.forward import q_chain, q_mean_std, q_sample, q_step
from course_lib.schedules import NoiseSchedule

N = 100_000


def _assert_moments(x, mean, var, n):
    se_mean = math.sqrt(var / n)
    se_var = var * math.sqrt(2 / (n - 1))
    assert (x.mean(0) - mean).abs().max() < 5 * se_mean, (x.mean(0), mean)
    assert (x.var(0) - var).abs().max() < 5 * se_var, (x.var(0), var)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_moments_match_closed_form(name, t):
    s = NoiseSchedule.named(name)
    g = torch.Generator().manual_seed(t)
    x0 = torch.tensor([[0.7, -1.3]], dtype=torch.float64).expand(N, 2)
    xt = q_sample(x0, torch.full((N,), t), s, generator=g)
    ab = s.alpha_bar[t].item()
    _assert_moments(xt, torch.tensor([0.7, -1.3], dtype=torch.float64) * math.sqrt(ab), 1 - ab, N)
    # the two coordinates are independent: correlation within 5 / sqrt(N)
    c = torch.corrcoef(xt.T)[0, 1]
    assert abs(c) < 5 / math.sqrt(N)


def test_q_sample_uses_given_noise_exactly():
    s = NoiseSchedule.named("linear", 100)
    x0, eps, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 50, 99])
    ab = s.alpha_bar[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(q_sample(x0, t, s, noise=eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    mean, std = q_mean_std(x0, t, s)
    torch.testing.assert_close(mean + std * eps, q_sample(x0, t, s, noise=eps))


def test_one_markov_step_moments():
    s = NoiseSchedule.named("linear", 1000)
    t = 600
    x = torch.full((N, 1), 2.0, dtype=torch.float64)
    y = q_step(x, t, s, generator=torch.Generator().manual_seed(1))
    beta = s.betas[t].item()
    _assert_moments(y, 2.0 * math.sqrt(1 - beta), beta, N)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_markov_chain_agrees_with_closed_form(name):
    s = NoiseSchedule.named(name, 1000)
    n = 20_000
    x0 = torch.tensor([1.0, -0.5], dtype=torch.float64).expand(n, 2).clone()
    keep = [10, 200, 999]
    _, kept = q_chain(x0, s, generator=torch.Generator().manual_seed(0), keep=keep)
    for t in keep:
        ab = s.alpha_bar[t].item()
        _assert_moments(kept[t], torch.tensor([1.0, -0.5], dtype=torch.float64) * math.sqrt(ab), 1 - ab, n)


def test_chain_t_end_and_dtype_preserved():
    s = NoiseSchedule.named("cosine", 20)
    x = torch.randn(5, 2)
    out = q_chain(x, s, t_end=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    # the same seed walks the same path
    again = q_chain(x, s, t_end=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_bad_inputs():
    s = NoiseSchedule.named("linear", 100)
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        q_sample(x, torch.tensor([0, 1, 100]), s)
    with pytest.raises(TypeError, match="integers"):
        q_sample(x, torch.tensor([0.0, 1.0, 2.0]), s)
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        q_sample(x, torch.tensor([0, 1]), s)
    with pytest.raises(TypeError, match="floating-point"):
        q_sample(torch.ones(3, 2, dtype=torch.long), torch.tensor([0, 1, 2]), s)
    with pytest.raises(TypeError, match="torch.Tensor"):
        q_sample([[0.0, 1.0]], 0, s)
    with pytest.raises(ValueError, match="noise must have"):
        q_sample(x, 5, s, noise=torch.randn(3, 3))
    with pytest.raises(ValueError, match="after t_end"):
        q_chain(x, s, t_end=5, keep=[9])
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        q_step(x, 100, s)
