"""Parametrizations, the posterior and the loss. Statistical tolerances: 5 standard errors at the stated N."""
import math

import pytest
import torch

from course_lib import losses as L
from course_lib.analytic import gaussian_eps_model
from course_lib.forward import q_sample
from course_lib.schedules import NoiseSchedule

KINDS = L.PREDICTIONS


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    s = NoiseSchedule.named("cosine", 1000)
    x0 = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 990, (64,), generator=g)  # stop short of the clipped end, where 1/sqrt(ab) explodes
    ab = s.at(s.alpha_bar, t, x0)
    return x0, eps, q_sample(x0, t, s, noise=eps), ab


@pytest.mark.parametrize("src", KINDS)
@pytest.mark.parametrize("dst", KINDS)
def test_conversions_round_trip_and_agree_with_the_truth(batch, src, dst):
    x0, eps, xt, ab = batch
    truth = {"eps": eps, "x0": x0, "v": L.v_target(x0, eps, ab), "score": -eps / (1 - ab).sqrt()}
    got = L.convert(truth[src], src, dst, xt, ab)
    torch.testing.assert_close(got, truth[dst], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(L.convert(got, dst, src, xt, ab), truth[src], rtol=1e-7, atol=1e-7)


def test_v_is_the_rotation_of_x0_and_eps(batch):
    x0, eps, xt, ab = batch
    v = L.v_target(x0, eps, ab)
    # (x_t, v) is a rotation of (x0, eps) by phi = atan2(sqrt(1-ab), sqrt(ab)): norms are preserved
    torch.testing.assert_close(xt**2 + v**2, x0**2 + eps**2)


@pytest.mark.parametrize("t", [5, 300])  # at t=5 the posterior variance is ~0.83 beta_t, at 300 ~beta_t
def test_posterior_matches_monte_carlo_regression(t):
    """Sample (x_{t-1}, x_t) given x0 and regress x_{t-1} on x_t: slope, intercept and residual variance
    are the posterior's mean coefficients and variance. N = 400,000: SE of the slope ~ 1.6e-3 * resid std."""
    s = NoiseSchedule.named("linear", 1000)
    g = torch.Generator().manual_seed(1)
    n, x0_val = 400_000, 0.8
    x0 = torch.full((n, 1), x0_val, dtype=torch.float64)
    x_prev = q_sample(x0, t - 1, s, generator=g)
    beta = s.betas[t].item()
    x_t = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * torch.randn(n, 1, generator=g, dtype=torch.float64)
    X = torch.cat([torch.ones(n, 1, dtype=torch.float64), x_t], 1)
    coef = torch.linalg.lstsq(X, x_prev).solution.flatten()
    resid_var = (x_prev - X @ coef[:, None]).var().item()
    mean, var = L.q_posterior(x0, x_t, t, s)
    # the posterior mean is linear in x_t: recover its intercept and slope from two points
    slope = ((mean[1] - mean[0]) / (x_t[1] - x_t[0])).item()
    intercept = (mean[0] - slope * x_t[0]).item()
    se_slope = math.sqrt(var.item() / (n * x_t.var().item()))
    assert abs(coef[1].item() - slope) < 5 * se_slope
    se_intercept = math.sqrt(var.item() / n * (1 + x_t.mean().item() ** 2 / x_t.var().item()))
    assert abs(coef[0].item() - intercept) < 5 * se_intercept
    assert abs(resid_var - var.item()) < 5 * var.item() * math.sqrt(2 / n)


def test_posterior_at_t0_is_exact_and_bad_shapes_fail():
    s = NoiseSchedule.named("linear", 100)
    x0, xt = torch.randn(3, 2), torch.randn(3, 2)
    mean, var = L.q_posterior(x0, xt, torch.zeros(3, dtype=torch.long), s)
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()
    with pytest.raises(ValueError, match="same shape"):
        L.q_posterior(x0, torch.randn(3, 3), 5, s)


@pytest.mark.parametrize("target", ["x0", "eps", "v", "score"])
def test_min_snr_weight_times_target_error_is_min_snr_times_x0_error(target):
    """The weight rescales each target's squared error to min(SNR, gamma) times the x0-space squared error.

    Independent of snr_weight's formula: the errors are measured by converting one perturbed prediction into every
    parametrization with `convert` at the same x_t."""
    g = torch.Generator().manual_seed(3)
    ab = torch.rand(64, 1, generator=g, dtype=torch.float64) * 0.998 + 0.001
    x0, eps = torch.randn(64, 8, generator=g, dtype=torch.float64), torch.randn(64, 8, generator=g, dtype=torch.float64)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    wrong_x0 = x0 + 0.1 * torch.randn(64, 8, generator=g, dtype=torch.float64)  # a model's imperfect prediction
    err = lambda kind: ((L.convert(wrong_x0, "x0", kind, x_t, ab) - L.from_eps(eps, kind, x_t, ab)) ** 2).sum(1)
    snr = (ab / (1 - ab)).flatten()
    w = L.snr_weight(snr, target, "min_snr", gamma=5.0)
    torch.testing.assert_close(w * err(target), snr.clamp(max=5.0) * err("x0"), rtol=1e-9, atol=1e-12)


def test_min_snr_weights():
    snr = torch.tensor([0.1, 1.0, 5.0, 50.0])
    torch.testing.assert_close(L.snr_weight(snr, "x0", "min_snr", 5.0), torch.tensor([0.1, 1.0, 5.0, 5.0]))
    torch.testing.assert_close(L.snr_weight(snr, "eps", "min_snr", 5.0), torch.tensor([1.0, 1.0, 1.0, 0.1]))
    torch.testing.assert_close(L.snr_weight(snr, "v", "min_snr", 5.0), torch.tensor([0.1 / 1.1, 0.5, 5 / 6, 5 / 51]))
    assert (L.snr_weight(snr, "eps") == 1).all()
    with pytest.raises(ValueError, match="weighting"):
        L.snr_weight(snr, "eps", "p2")
    with pytest.raises(ValueError, match="prediction type"):
        L.snr_weight(snr, "noise")


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_loss_is_zero_for_the_exact_model_and_positive_otherwise(kind):
    """A model that knows x0 returns the exact target for every parametrization: loss 0 to rounding."""
    s = NoiseSchedule.named("cosine", 200)
    x0 = torch.randn(32, 2, dtype=torch.float64)

    def oracle(x_t, t):
        ab = s.at(s.alpha_bar, t, x_t)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return L.from_eps(eps, kind, x_t, ab) if kind != "x0" else x0

    g = torch.Generator().manual_seed(0)
    assert L.diffusion_loss(oracle, x0, s, kind, generator=g).item() < 1e-12
    zero = L.diffusion_loss(lambda x_t, t: torch.zeros_like(x_t), x0, s, kind, generator=g)
    assert zero.item() > 0.1
    with pytest.raises(ValueError, match="output shape"):
        L.diffusion_loss(lambda x_t, t: x_t[:, :1], x0, s, kind)


def test_one_optimisation_step_decreases_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    s = NoiseSchedule.named("cosine", 100)
    x0 = torch.randn(256, 2)
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))
    model = lambda x_t, t: net(torch.cat([x_t, (t.float() / s.T)[:, None]], 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    loss = lambda: L.diffusion_loss(model, x0, s, generator=torch.Generator().manual_seed(7))
    before = loss()
    before.backward()
    opt.step()
    assert loss().item() < before.item()


def _gaussian_eps_model(schedule, sd):
    return gaussian_eps_model(schedule, sd)


def test_the_bound_is_tight_for_the_exact_model_of_unit_gaussian_data():
    # For x ~ N(0, 1) the variance-preserving chain is stationary, the true reverse step is
    # N(sqrt(alpha_t) x_t, beta_t), so the exact model with variance beta_t makes the bound an equality.
    s = NoiseSchedule.named("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    r = L.variational_bound(_gaussian_eps_model(s, 1.0), x, s, variance="beta", generator=g)
    nll = 2 * 0.5 * math.log(2 * math.pi * math.e)
    se = r["total"].std().item() / math.sqrt(len(x))
    assert abs(r["total"].mean().item() - nll) < 5 * se and se < 0.05
    torch.testing.assert_close(r["total"], r["prior"] + r["diffusion"] + r["decoder"])
    torch.testing.assert_close(r["bits_per_dim"], r["total"] / (2 * math.log(2)))
    # beta-tilde is the wrong variance here: the bound is loose, by far more than its noise
    loose = L.variational_bound(_gaussian_eps_model(s, 1.0), x, s, variance="posterior", generator=g)["total"]
    assert loose.mean().item() - nll > 10 * se
    # a wrong model pays for it: predicting zero noise is far worse
    zero = lambda x, t: torch.zeros_like(x)
    assert L.variational_bound(zero, x, s, prediction="eps", generator=g)["total"].mean() > nll + 1


def test_the_random_timestep_estimate_is_unbiased():
    s = NoiseSchedule.named("cosine", 200)
    g = torch.Generator().manual_seed(1)
    x = 0.5 * torch.randn(4000, 2, generator=g, dtype=torch.float64)
    model = _gaussian_eps_model(s, 0.5)
    full = L.variational_bound(model, x, s, generator=g)["diffusion"]
    est = L.variational_bound(model, x, s, n_t=2, generator=g)["diffusion"]
    se = math.hypot(full.std().item(), est.std().item()) / math.sqrt(len(x))
    assert abs(full.mean().item() - est.mean().item()) < 5 * se


def test_the_discretized_likelihood_is_a_distribution_over_the_levels():
    levels = 17
    values = torch.linspace(-1, 1, levels, dtype=torch.float64)
    for mean, var in [(0.0, 0.01), (0.93, 0.2), (-1.3, 1e-4)]:
        logp = L.discretized_gaussian_log_likelihood(values, torch.full_like(values, mean), var, levels)
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_clipping_the_x0_estimate_can_only_lower_the_bound_of_data_in_range():
    # discrete data in [-1, 1] and an eps model that is slightly wrong: at the cosine schedule's last steps its x0
    # estimate divides the error by sqrt(alpha_bar) and lands far outside [-1, 1]; clamping it is a better model
    s = NoiseSchedule.named("cosine", 200)
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(0, 17, (500, 4), generator=g).double() / 8 - 1)
    exact = _gaussian_eps_model(s, x.std().item())
    model = lambda x_t, t: exact(x_t, t) + 0.05
    runs = {clip: L.variational_bound(model, x, s, "eps", variance="beta", levels=17, clip=clip,
                                      generator=torch.Generator().manual_seed(4)) for clip in (None, 1.0)}
    assert (runs[1.0]["total"] <= runs[None]["total"] + 1e-9).all()  # same noise draws: term by term
    last = torch.full((len(x),), s.T - 1)
    tail = {clip: L.vlb_term(model, x, last, s, "eps", clip=clip, generator=torch.Generator().manual_seed(5)).mean().item()
            for clip in (None, 1.0)}
    assert tail[1.0] < tail[None] / 10  # the last step is where the unclipped estimate explodes
    with pytest.raises(ValueError, match="clip"):
        L.variational_bound(model, x, s, "eps", clip=0)


def test_variational_bound_rejects_bad_input():
    s = NoiseSchedule.named("linear", 50)
    model = _gaussian_eps_model(s, 1.0)
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="variance"):
        L.variational_bound(model, x, s, variance="learned")
    with pytest.raises(ValueError, match="n_t"):
        L.variational_bound(model, x, s, n_t=0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        L.variational_bound(model, x + 3, s, levels=17)
    with pytest.raises(ValueError, match="prediction type"):
        L.variational_bound(lambda x, t: x, x, s)
