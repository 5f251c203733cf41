"""Lesson 12's few-step math (course_lib.consistency) against closed forms: the Gaussian's probability-flow ODE is
solved exactly by analytic.gaussian_ode_solution, so its consistency function, its teacher steps and its samples are
known; the mixture's by a fine solve."""
import math

import pytest
import torch
from scipy.stats import norm

from course_lib import consistency as C
from course_lib.analytic import gaussian_ode_solution, mixture_denoiser
from course_lib.data import ring_of_gaussians
from course_lib.step_schedules import karras_sigmas

STD, MEAN = 0.7, 0.3


def gauss_D(x, sigma):
    """The exact denoiser of N(MEAN, STD^2) per coordinate, sigma one number or one per row."""
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return MEAN + STD**2 / (STD**2 + s * s) * (x - MEAN)


def gauss_f(x, sigma):
    """The exact consistency function of N(MEAN, STD^2): the ODE's flow from sigma down to sigma_min, in closed form."""
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return MEAN + (x - MEAN) * ((STD**2 + C.SIGMA_MIN**2) / (STD**2 + s * s)).sqrt()


def test_boundary_coefficients_by_hand():
    c_skip, c_out = C.boundary_coefficients(torch.tensor([C.SIGMA_MIN, 0.502, 1e4]), sigma_data=0.5)
    torch.testing.assert_close(c_skip, torch.tensor([1.0, 0.5, 0.25 / (0.25 + (1e4 - 0.002) ** 2)], dtype=torch.float64))
    torch.testing.assert_close(c_out, torch.tensor([0.0, 0.5 / math.sqrt(0.5), 1.0], dtype=torch.float64), atol=1e-6,
                               rtol=0)
    with pytest.raises(ValueError, match="sigma_min"):
        C.boundary_coefficients(0.001)


def test_the_boundary_condition_holds_for_any_denoiser():
    x = torch.randn(16, 3, 4, 4)
    garbage = torch.randn_like(x) * 100
    torch.testing.assert_close(C.consistency_output(garbage, x, C.SIGMA_MIN), x)
    rows = torch.tensor([C.SIGMA_MIN] * 8 + [5.0] * 8)
    out = C.consistency_output(garbage, x, rows)
    torch.testing.assert_close(out[:8], x[:8])
    assert not torch.allclose(out[8:], x[8:])


def test_karras_grid_is_the_samplers_karras_levels_reversed():
    grid = C.karras_grid(17)
    torch.testing.assert_close(grid, karras_sigmas(18, C.SIGMA_MIN, C.SIGMA_MAX)[:-1].flip(0))
    assert grid[0] == pytest.approx(C.SIGMA_MIN) and grid[-1] == pytest.approx(C.SIGMA_MAX)
    with pytest.raises(ValueError):
        C.karras_grid(0)


def test_heun_step_is_third_order_on_the_gaussian():
    x = torch.randn(4000, 1, dtype=torch.float64) * 3
    errs = []
    for h in (0.4, 0.2, 0.1):
        step = C.ode_step(gauss_D, x, 1.5, 1.5 - h, "heun")
        errs.append(float((step - gaussian_ode_solution(x, 1.5, 1.5 - h, STD, MEAN)).abs().max()))
    assert 5 < errs[0] / errs[1] < 11 and 5 < errs[1] / errs[2] < 11, errs  # local error O(h^3): ratio 8
    euler = float((C.ode_step(gauss_D, x, 1.5, 1.4, "euler") - gaussian_ode_solution(x, 1.5, 1.4, STD, MEAN)).abs().max())
    assert euler > 10 * errs[2]
    with pytest.raises(ValueError, match="euler"):
        C.ode_step(gauss_D, x, 1.0, 0.0, "heun")


def test_flow_map_matches_the_closed_form():
    x = torch.randn(1000, 2, dtype=torch.float64) * 20
    exact = gauss_f(x, torch.full((1000,), 20.0, dtype=torch.float64))
    errs = [float((C.ode_flow_map(gauss_D, x, 20.0, C.SIGMA_MIN, steps=k) - exact).abs().max()) for k in (100, 200)]
    assert errs[1] < 1e-3 * float(exact.abs().max())
    assert 3 < errs[0] / errs[1] < 5  # Heun's global error O(h^2): ratio 4


def test_distillation_loss_of_the_exact_function_shrinks_at_the_solvers_order():
    g = torch.Generator().manual_seed(0)
    x0 = MEAN + STD * torch.randn(20000, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    losses = {}
    for solver in ("euler", "heun"):
        for h in (0.1, 0.05):
            losses[solver, h] = float(C.consistency_distillation_loss(gauss_f, gauss_f, gauss_D, x0, noise, 1.0, 1.0 - h,
                                                                      solver))
    # the squared local error: O(h^4) for Euler (ratio 16), O(h^6) for Heun (ratio 64)
    assert 11 < losses["euler", 0.1] / losses["euler", 0.05] < 22
    assert 45 < losses["heun", 0.1] / losses["heun", 0.05] < 90
    assert losses["heun", 0.05] < 1e-2 * losses["euler", 0.05]


def test_distillation_gradient_reaches_the_student_only():
    lin_s, lin_t = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    student = lambda x, s: C.consistency_output(lin_s(x), x, s)
    target = lambda x, s: C.consistency_output(lin_t(x), x, s)
    x0, noise = torch.randn(64, 2), torch.randn(64, 2)
    loss = C.consistency_distillation_loss(student, target, gauss_D, x0, noise, torch.full((64,), 2.0),
                                           torch.full((64,), 1.5), "euler")
    loss.backward()
    assert lin_s.weight.grad is not None and lin_s.weight.grad.abs().sum() > 0
    assert lin_t.weight.grad is None


def test_training_loss_weighting_by_hand():
    x0, noise = torch.randn(32, 5), torch.randn(32, 5)
    identity = lambda x, s: x
    got = C.consistency_training_loss(identity, identity, x0, noise, 2.0, 1.5, kind="l2")
    want = ((0.5 * noise) ** 2).mean(1).div(0.5).mean()
    torch.testing.assert_close(got, want)


def test_multistep_sampling_with_the_exact_function_draws_the_gaussian():
    n = 40_000
    for sigmas in ([80.0], [80.0, 0.8], [80.0, 2.0, 0.5, 0.1]):
        g = torch.Generator().manual_seed(len(sigmas))
        x = C.multistep_sample(gauss_f, torch.randn(n, 1, generator=g, dtype=torch.float64), sigmas, generator=g)
        want_std = math.sqrt(STD**2 + C.SIGMA_MIN**2)
        # standard errors: mean std/sqrt(n) = 0.0035, std std/sqrt(2n) = 0.0025; 5 of them
        assert abs(float(x.mean()) - MEAN) < 5 * STD / math.sqrt(n)
        assert abs(float(x.std()) - want_std) < 5 * STD / math.sqrt(2 * n)
    with pytest.raises(ValueError, match="decrease"):
        C.multistep_sample(gauss_f, torch.randn(4, 1), [1.0, 2.0])


def test_multistep_sampling_with_the_mixtures_flow_map_covers_the_ring():
    ring = ring_of_gaussians()
    D = mixture_denoiser(ring)
    f = lambda x, s: C.ode_flow_map(D, x, float(s[0]), C.SIGMA_MIN, steps=60)
    g = torch.Generator().manual_seed(0)
    x = C.multistep_sample(f, torch.randn(4000, 2, generator=g), [80.0, 1.0], generator=g)
    d = torch.cdist(x, ring.modes.to(x.dtype))
    near = d.min(1).values < 3 * ring.std
    counts = torch.bincount(d.argmin(1)[near], minlength=len(ring.modes))
    assert near.float().mean() > 0.95 and counts.min() > 0.6 * 4000 / len(ring.modes)


def test_progressive_target_by_hand_on_the_gaussian():
    x = torch.randn(50, 3, dtype=torch.float64) * 2
    s, m, e = 2.0, 1.2, 0.5
    a = lambda v: STD**2 / (STD**2 + v * v)
    # Euler from s to s' with D(x) = MEAN + a (x - MEAN): x - MEAN scales by 1 + (s' - s)(1 - a(s)) / s
    step = lambda y, v, w: MEAN + (y - MEAN) * (1 + (w - v) * (1 - a(v)) / v)
    x_end = step(step(x, s, m), m, e)
    want = (x_end - (e / s) * x) / (1 - e / s)
    torch.testing.assert_close(C.progressive_target(gauss_D, x, s, m, e), want)
    # one DDIM step from x with that estimate lands where the teacher's two steps did
    one = want + (e / s) * (x - want)
    torch.testing.assert_close(one, x_end)
    # to sigma 0: the target is the teacher's estimate at the middle level
    torch.testing.assert_close(C.progressive_target(gauss_D, x, s, m, 0.0), gauss_D(step(x, s, m), m))
    with pytest.raises(ValueError, match="steps down"):
        C.progressive_target(gauss_D, x, 1.0, 1.5, 0.5)


def test_lognormal_indices_follow_the_discretised_lognormal():
    grid = C.karras_grid(40)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    idx = C.lognormal_grid_indices(n, grid, g)
    cdf = norm.cdf((grid.log().numpy() + 1.1) / 2.0)
    p = torch.tensor(cdf[1:] - cdf[:-1])
    p = p / p.sum()
    freq = torch.bincount(idx, minlength=40).double() / n
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-9).all()


def test_improved_ct_curriculum():
    total = 8000  # log2(1280 / 10) + 1 = 8 stages of 1,000 steps
    assert [C.improved_ct_steps(k, total) for k in (0, 999, 1000, 2500, 7999, 9000)] == [10, 10, 20, 40, 1280, 1280]


def test_an_eps_teacher_as_a_per_row_denoiser_is_the_samplers_denoiser():
    from course_lib.checkpoints import load_pretrained
    from course_lib.nets import EDMPrecond
    from course_lib.samplers import as_denoiser

    loaded = load_pretrained("digits")
    D, P = as_denoiser(loaded.model, loaded.schedule), EDMPrecond.from_eps_model(loaded.model, "cosine", 1000)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sig = [0.01, 0.5, 3.0, 80.0]
    with torch.no_grad():
        rows = P(torch.cat([x * (1 + s) for s in sig]), torch.tensor(sig).repeat_interleave(6))
        for i, s in enumerate(sig):
            torch.testing.assert_close(rows[6 * i:6 * i + 6], D(x * (1 + s), s), atol=1e-4 * (1 + s), rtol=1e-4)
    with pytest.raises(ValueError, match="eps"):
        EDMPrecond.from_eps_model(P, "cosine")


def test_consistency_net_meets_the_boundary_and_rebuilds():
    from course_lib.nets import ConsistencyNet, build_model

    inner = {"kind": "edm_precond", "net": {"kind": "mlp", "dim": 2, "hidden": 32, "depth": 2}}
    f = ConsistencyNet(inner, sigma_data=0.7)
    x = torch.randn(10, 2) * 3
    with torch.no_grad():
        torch.testing.assert_close(f(x, C.SIGMA_MIN), x)
        far = f(x, torch.full((10,), 1e4))
        torch.testing.assert_close(far, f.denoiser(x, torch.full((10,), 1e4)), atol=1e-3, rtol=1e-3)
        c_skip, c_out = C.boundary_coefficients(torch.tensor([0.3, 2.0]), 0.7)
        torch.testing.assert_close(f(x[:2], torch.tensor([0.3, 2.0])), (c_skip[:, None] * x[:2] + c_out[:, None]
                                   * f.denoiser(x[:2], torch.tensor([0.3, 2.0]))).float())
    g = build_model(f.config)
    g.load_state_dict(f.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(g(x, 1.5), f(x, 1.5))
    with pytest.raises(ValueError, match="sigma_min"):
        f(x, 0.001)
    with pytest.raises(ValueError, match="edm_precond"):
        ConsistencyNet({"kind": "mlp"})


class _GaussianConsistency(torch.nn.Module):
    """The exact consistency function of 1-D data N(m, s^2) (its ODE is linear): f(x, sigma) = m + (x - m)
    sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma^2), as a model the course's samplers take (prediction 'edm')."""
    prediction = "edm"

    def __init__(self, m, s, sigma_min):
        super().__init__()
        self.m, self.s, self.lo = m, s, sigma_min
        self.sigma_min, self.sigma_max = sigma_min, 80.0

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        return self.m + (x - self.m) * math.sqrt(self.s**2 + self.lo**2) / (self.s**2 + sigma**2).sqrt()


@pytest.mark.parametrize("levels", [[80.0, 0.0], [80.0, 1.5, 0.0], [20.0, 3.0, 0.7, 0.2]])
def test_the_consistency_sampler_draws_the_data_with_an_exact_consistency_function(levels):
    """Algorithm 1 with the exact f of N(0.3, 0.4^2) and sigma_min 0.1: whatever the levels, the samples are
    N(0.3, 0.4^2 + 0.1^2); 40,000 draws give the mean to +-0.006 and the std to +-1.1% (3 standard errors). (The start,
    noise of std sqrt(1 + sigma^2) around 0 as every sampler takes it, ignores the data's mean: 0.3 x 0.41 / 20 at
    most, well inside.)"""
    from course_lib.samplers import sample

    f = _GaussianConsistency(0.3, 0.4, 0.1)
    noise = torch.randn(40_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(f, noise, sampler="consistency", sigmas=levels, sigma_min=0.1,
                 generator=torch.Generator().manual_seed(1))
    assert out.nfe == len([v for v in levels if v > 0])
    want_std = math.sqrt(0.4**2 + 0.1**2)
    assert abs(float(out.x.mean()) - 0.3) < 3 * want_std / 200
    assert abs(float(out.x.std()) / want_std - 1) < 0.012


def test_the_consistency_sampler_is_algorithm_1_of_the_library():
    from course_lib.samplers import sample

    f = _GaussianConsistency(0.0, 0.5, C.SIGMA_MIN)
    noise = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = sample(f, noise, sampler="consistency", sigmas=[80.0, 2.0, 0.5, 0.0], generator=torch.Generator().manual_seed(3))
    # sample() starts from noise * sqrt(1 + sigma^2), the samplers' prior; multistep_sample from noise * sigma
    want = C.multistep_sample(f, noise * math.sqrt(1 + 80.0**2) / 80.0, [80.0, 2.0, 0.5],
                              generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got.x, want)
    # a level below sigma_min is evaluated at sigma_min, where f is the identity: the second call changes nothing
    low = sample(f, noise, sampler="consistency", sigmas=[80.0, 0.001, 0.0], generator=torch.Generator().manual_seed(3))
    one = sample(f, noise, sampler="consistency", sigmas=[80.0, 0.0])
    assert low.nfe == 2
    torch.testing.assert_close(low.x, one.x)
