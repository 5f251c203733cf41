"""Lesson 9's library: scores, Langevin, SDEs, the probability-flow ODE likelihood, flow matching and reflow.

Checked against independent derivations: autograd of exact log-densities, closed-form Gaussian flows, finite
differences of the interpolant, a general-purpose ODE solver (scipy) and moments of exact targets."""
import json
import math

import pytest
import torch

from course_lib import flow, likelihood, score, sde
from course_lib.analytic import gaussian_denoiser, gaussian_ode_solution, mixture_denoiser
from course_lib.data import GaussianMixture2D, grid_of_gaussians, ring_of_gaussians
from course_lib.samplers import Denoiser, as_denoiser, as_model, sample, sample_dpmpp_2m, sample_heun
from course_lib.schedules import NoiseSchedule
from course_lib.step_schedules import get_sigmas, karras_sigmas
from course_lib.train import TrainConfig, Trainer


def _smoothed(mixture, sigma):
    return GaussianMixture2D("smoothed", mixture.modes, math.sqrt(mixture.std**2 + sigma**2))


# ---- scores and Langevin ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.0, 0.03, 0.3, 2.0])
def test_mixture_score_is_the_gradient_of_the_log_density(sigma):
    mix = grid_of_gaussians()
    x = (torch.rand(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5) * 3
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(_smoothed(mix, sigma).log_prob(x).sum(), x)
    assert torch.allclose(score.mixture_score(mix, x.detach(), sigma), grad, atol=1e-8, rtol=1e-6)
    if sigma > 0:  # Tweedie: the exact denoiser is the same score
        assert torch.allclose(score.score_from_denoiser(mixture_denoiser(mix), x.detach(), sigma), grad, rtol=1e-6,
                              atol=1e-6)


def test_dsm_loss_is_minimised_by_the_true_score():
    # data N(0, I) in 2D: p_sigma = N(0, (1 + s^2) I), the exact loss at the true score is d / (1 + s^2)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(200_000, 2, generator=g, dtype=torch.float64)
    s = 0.7
    true = score.dsm_loss(lambda x, sig: -x / (1 + s * s), x0, s, generator=torch.Generator().manual_seed(1)).item()
    assert abs(true - 2 / (1 + s * s)) < 0.02  # standard error about 0.004 at 200,000 rows
    # a score 20% too large costs s^2 E||0.2 score||^2 = s^2 0.04 d / (1 + s^2) more (same noise: no Monte Carlo gap)
    worse = score.dsm_loss(lambda x, sig: -x / (1 + s * s) * 1.2, x0, s, generator=torch.Generator().manual_seed(1)).item()
    assert worse - true == pytest.approx(s * s * 0.04 * 2 / (1 + s * s), rel=0.05)


def test_langevin_samples_a_gaussian_and_cannot_leave_a_mode_that_annealing_escapes():
    g = torch.Generator().manual_seed(0)
    m, std = 0.4, 0.5
    x = score.langevin(lambda z: -(z - m) / std**2, torch.zeros(20_000, 2), step_size=0.01, steps=400, generator=g)
    # ULA's bias at this step: the stationary variance is std^2 / (1 - step / (4 std^2)), 1% above std^2
    assert abs(x.mean().item() - m) < 0.01 and abs(x.std().item() - std) < 0.01
    mix = ring_of_gaussians()
    start = mix.modes[0].expand(1000, 2).clone()
    _, path = score.langevin(lambda z: score.mixture_score(mix, z), start, 1e-4, 500, g, keep_every=500)
    assert score.mode_switches(path, mix) == 0.0  # modes 0.77 apart with std 0.05: no chain crosses
    sig = score.geometric_sigmas(10, 2.0, 0.05)
    out = score.annealed_langevin(lambda z, s: score.mixture_score(mix, z, s), 2 * torch.randn(4000, 2, generator=g),
                                  sig, 60, eps=2e-4, generator=g)
    from course_lib.metrics import mode_counts

    counts = mode_counts(out, mix).double()
    share = counts / 4000  # 8 equal modes: each about 1/8, standard error 0.005 per mode
    assert share.min() > 0.125 - 0.04 and share.max() < 0.125 + 0.04


# ---- SDEs and the probability-flow ODE -----------------------------------------------------------------------------

def test_vp_sde_is_the_limit_of_the_linear_schedule_and_its_forward_process_has_the_stated_marginal():
    schedule = NoiseSchedule.named("linear", 1000)
    t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    vp = sde.VPSDE()
    assert (schedule.alpha_bar - torch.exp(vp.log_alpha_bar(t))).abs().max() < 2e-3
    # simulate dx = f dt + g dw forward from N(0, 0.3^2): its variance at t follows scale^2 s^2 + std^2
    g = torch.Generator().manual_seed(1)
    for proc in (vp, sde.VESDE(0.01, 5.0)):
        x = 0.3 * torch.randn(20_000, 1, generator=g, dtype=torch.float64)
        ts = torch.linspace(0, 0.6, 301, dtype=torch.float64).tolist()
        for a, b in zip(ts[:-1], ts[1:]):
            x = sde.euler_maruyama_step(x, proc.drift(x, a), proc.diffusion(a), b - a,
                                        torch.randn(x.shape, generator=g, dtype=torch.float64))
        want = proc.scale(0.6) ** 2 * 0.09 + proc.std(0.6) ** 2 - (proc.sigma_min**2 if proc is not vp else 0)
        assert abs(x.var().item() / want - 1) < 0.05  # sample variance: relative standard error 1% at 20,000


@pytest.mark.parametrize("proc", [sde.VPSDE(), sde.VESDE(0.01, 20.0)], ids=["vp", "ve"])
def test_the_reverse_sde_with_the_exact_score_recovers_a_gaussian(proc):
    m, s = 0.5, 0.3
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(10_000, 2, generator=g, dtype=torch.float64) * proc.std(1.0)
    out = sde.sample_reverse_sde(proc, sde.score_fn(proc, gaussian_denoiser(s, m)), x1, 500, generator=g)
    out = out / proc.scale(1e-3)
    # standard errors: 0.003 for the mean, 0.002 for the std (5 of them, less Euler-Maruyama's small bias: at most
    # 0.008 over 4 seeds when this was written)
    assert (out.mean(0) - m).abs().max() < 0.015 and (out.std(0) - s).abs().max() < 0.015


def test_the_probability_flow_ode_is_what_the_ode_samplers_solve():
    mix = ring_of_gaussians()
    den, vp = mixture_denoiser(mix), sde.VPSDE()
    noise = torch.randn(200, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref, nfe = sde.solve_pf_ode(vp, sde.score_fn(vp, den), noise, 1.0, 1e-3, rtol=1e-9, atol=1e-9)
    ref = ref / vp.scale(1e-3)
    sigmas = karras_sigmas(300, vp.sigma(1e-3), vp.sigma(1.0))[:-1]
    for solver in (sample_heun, sample_dpmpp_2m):
        err = (solver(den, noise / vp.scale(1.0), sigmas) - ref).norm(dim=1)
        assert err.median() < 1e-3, solver.__name__


# ---- exact likelihood ---------------------------------------------------------------------------------------------

def test_ode_likelihood_of_a_gaussian_is_its_closed_form():
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = likelihood.ode_log_likelihood(gaussian_denoiser(1.0), x)  # N(0, I): the VP prior is exactly p_top
    assert (r["log_p"] - likelihood.log_normal(x, 1.0)).abs().max() < 1e-3
    m, s = 0.3, 0.5
    xx = m + s * x
    r = likelihood.ode_log_likelihood(gaussian_denoiser(s, m), xx,
                                      prior=lambda z, sig: likelihood.log_normal(z - m, math.sqrt(s * s + sig * sig)))
    assert (r["log_p"] - likelihood.log_normal(xx - m, s)).abs().max() < 1e-3


def test_ode_likelihood_of_the_exact_mixture_is_its_log_density():
    mix = ring_of_gaussians()
    x = mix.sample(100, torch.Generator().manual_seed(0)).double()
    r = likelihood.ode_log_likelihood(mixture_denoiser(mix), x,
                                      prior=lambda z, sig: _smoothed(mix, sig).log_prob(z))
    err = r["log_p"] - mix.log_prob(x)
    assert err.abs().mean() < 2e-3 and err.abs().max() < 2e-2


def test_hutchinson_trace_is_unbiased():
    # a correlated 4D Gaussian: dD/dx is not diagonal, so single Rademacher probes are noisy
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    cov = q @ torch.diag(torch.tensor([0.1, 0.3, 1.0, 2.0], dtype=torch.float64)) @ q.T

    def d_fn(x, sigma):
        return x @ torch.linalg.solve(cov + sigma**2 * torch.eye(4, dtype=x.dtype), cov).to(x.dtype)

    den = Denoiser(d_fn, 0.002, 80.0)
    x = torch.randn(400, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    exact = likelihood.ode_log_likelihood(den, x, trace="exact", rtol=1e-6, atol=1e-6)["log_p"]
    hutch = likelihood.ode_log_likelihood(den, x, trace="hutchinson", rtol=1e-6, atol=1e-6, seed=5)["log_p"]
    diff = hutch - exact
    assert diff.std() > 1e-3  # the estimator really is noisy per row ...
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff))  # ... and unbiased


def test_bits_per_dim_of_a_uniform_density_over_the_dequantised_bins_is_log2_levels():
    levels, dims = 17, 64
    width = 2 / (levels - 1)
    nll = dims * math.log(levels * width)  # uniform density over [-1 - w/2, 1 + w/2]^64
    assert likelihood.bits_per_dim(torch.tensor([nll]), dims, levels).item() == pytest.approx(math.log2(levels))
    x = torch.linspace(-1, 1, levels).repeat(100)
    u = likelihood.dequantise(x, levels, torch.Generator().manual_seed(0)) - x
    assert u.abs().max() <= width / 2 and u.std().item() == pytest.approx(width / math.sqrt(12), rel=0.05)


# ---- flow matching ----------------------------------------------------------------------------------------------------

def test_the_flow_matching_target_is_the_time_derivative_of_the_path():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g, dtype=torch.float64)
    t, h = torch.rand(64, generator=g, dtype=torch.float64) * 0.9 + 0.05, 1e-6
    fd = (flow.interpolate(x0, noise, t + h) - flow.interpolate(x0, noise, t - h)) / (2 * h)
    assert torch.allclose(fd, flow.velocity_target(x0, noise), atol=1e-8)
    assert torch.equal(flow.interpolate(x0, noise, 0.0), x0) and torch.equal(flow.interpolate(x0, noise, 1.0), noise)


def test_pseudo_huber_is_quadratic_near_zero_linear_far_and_what_the_reflow_loss_computes():
    pred, target = torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.zeros(2, 2)
    assert flow.pseudo_huber(pred, target, 1.0).tolist() == pytest.approx([math.sqrt(26) - 1, 0.0])
    small, far = torch.tensor([[1e-4, 0.0]]), torch.tensor([[1e3, 0.0]])
    assert float(flow.pseudo_huber(small, torch.zeros(1, 2), 0.01)) == pytest.approx(1e-8 / 0.02, rel=1e-3)  # d^2/2c
    assert float(flow.pseudo_huber(far, torch.zeros(1, 2), 0.01)) == pytest.approx(1e3 - 0.01, rel=1e-6)  # |d| - c
    # a constant fitted to 90 zeros and 10 tens: the squared error's minimiser is the mean (1), pseudo-Huber's stays
    # near the bulk (its gradient from each outlier is bounded by 1)
    y = torch.cat([torch.zeros(90, 1), torch.full((10, 1), 10.0)])
    grid = torch.linspace(-1, 3, 4001)
    mse = torch.stack([((g - y) ** 2).mean() for g in grid])
    hub = torch.stack([flow.pseudo_huber(g.expand(100, 1), y, 0.01).mean() for g in grid])
    assert float(grid[mse.argmin()]) == pytest.approx(1.0, abs=1e-3) and abs(float(grid[hub.argmin()])) < 0.01
    with pytest.raises(ValueError, match="c must be > 0"):
        flow.pseudo_huber(pred, target, 0.0)
    # in the loss: the same x_t and t as the squared error, per-sample pseudo-Huber distance to noise - x0, averaged
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g), torch.rand(32, generator=g)
    seen = {}

    def model(x, tt):
        seen["x"], seen["t"] = x, tt
        return torch.sin(x)

    got = flow.flow_matching_loss(model, x0, noise, t, loss="pseudo_huber", huber_c=0.05)
    assert torch.allclose(seen["x"], (1 - t[:, None]) * x0 + t[:, None] * noise)
    d = torch.sin(seen["x"]) - (noise - x0)
    assert float(got) == pytest.approx(float((torch.sqrt((d ** 2).sum(1) + 0.05 ** 2) - 0.05).mean()), rel=1e-6)
    assert float(flow.flow_matching_loss(model, x0, noise, t)) == pytest.approx(float((d ** 2).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="loss must be one of"):
        flow.flow_matching_loss(model, x0, noise, t, loss="l1")
    for bad in ({"loss": "l1"}, {"huber_c": 0}):
        with pytest.raises(ValueError, match="loss must be one of|huber_c must be"):
            TrainConfig(data="ring8", family="flow", **bad)


def _exact_models(mix, schedule):
    """The mixture's exact denoiser as an eps model on `schedule` and as a flow velocity model."""
    den = mixture_denoiser(mix)

    def velocity(x_t, t_in):
        t = float(t_in.flatten()[0]) / flow.TIME_SCALE
        return (x_t - den(x_t / (1 - t), flow.sigma_of_t(t))) / t

    velocity.prediction = "flow"
    return den, as_model(den, schedule, "eps"), velocity


def test_the_velocity_adapter_agrees_with_the_eps_adapter_on_equivalent_models():
    mix, schedule = ring_of_gaussians(), NoiseSchedule.named("linear", 1000)
    den, eps_model, v_model = _exact_models(mix, schedule)
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d_eps, d_flow = as_denoiser(eps_model, schedule), as_denoiser(v_model)
    assert d_flow.path == "linear" and d_eps.path == "vp"
    for step in (0, 10, 200, 700, 999):
        sigma = float(schedule.sigmas[step])
        assert torch.allclose(d_eps(x * 3, sigma), d_flow(x * 3, sigma), atol=1e-8)
    sig = get_sigmas(12, "uniform", schedule)  # on the schedule's grid, where as_model's eps model is exact
    assert torch.allclose(sample_dpmpp_2m(d_eps, x * 20, sig), sample_dpmpp_2m(d_flow, x * 20, sig), atol=1e-6)


def _random_velocity_model():
    """A small random network as a flow model (prediction 'flow'), float64: for checking samplers against hand-written
    steps."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def v(x_t, t_in):
        return net(torch.cat([x_t, t_in.to(x_t.dtype)[:, None] / flow.TIME_SCALE], 1))

    v.prediction = "flow"
    return v


def test_euler_on_a_flow_model_is_euler_in_t_on_its_ode():
    torch.manual_seed(0)
    v = _random_velocity_model()
    noise = torch.randn(50, 2, dtype=torch.float64)
    res = sample(v, noise, sampler="euler", steps=8, spacing="uniform")
    x, ts = noise.clone(), torch.linspace(flow.T_MAX, 0, 9, dtype=torch.float64).tolist()
    x = x * (1 - flow.T_MAX) * (1 + flow.sigma_of_t(flow.T_MAX))  # the sampler starts at prior_std(sigma_max) * noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * v(x, torch.full((50,), t * flow.TIME_SCALE, dtype=torch.float64))
    assert torch.allclose(res.x, x, atol=1e-9)
    # an untuned flow model's default levels are uniform in t (Karras levels up to sigma 1e5 ruin a few-step run)
    default = sample(v, noise, sampler="euler", steps=8)
    assert default.spacing == "uniform in t" and torch.equal(default.x, res.x)


def test_heun_on_a_flow_model_is_heun_in_t_on_its_ode():
    torch.manual_seed(1)
    v = _random_velocity_model()
    noise = torch.randn(50, 2, dtype=torch.float64)
    res = sample(v, noise, sampler="heun", steps=6, spacing="uniform")
    x, ts = noise * (1 - flow.T_MAX) * (1 + flow.sigma_of_t(flow.T_MAX)), torch.linspace(flow.T_MAX, 0, 7).tolist()
    vel = lambda x, t: v(x, torch.full((50,), t * flow.TIME_SCALE, dtype=torch.float64))  # noqa: E731
    for t, t_next in zip(ts[:-1], ts[1:]):  # the trapezoid in t; the last step, to t = 0, is Euler's
        guess = x + (t_next - t) * vel(x, t)
        x = x + (t_next - t) * (vel(x, t) + vel(guess, t_next)) / 2 if t_next > 0 else guess
    assert torch.allclose(res.x, x, atol=1e-9)


def test_heun_on_the_linear_path_is_second_order_from_the_flows_first_level():
    # data N(0.3, 0.5^2): the exact ODE map is closed-form (analytic.gaussian_ode_solution, the same in the sigma view
    # for either path). Levels uniform in t from t = 1 - 1e-5 (sigma = 1e5), as for every untuned flow model. Heun in
    # sigma multiplied D's first change by ~1e5 / (2 sigma_1) there: its error at 32 steps was 0.75, ten times Euler's
    # (0.077) and 900 times Heun in t's (0.00086)
    exact = gaussian_denoiser(0.5, 0.3)
    den = Denoiser(exact.fn, path="linear")
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs, euler = [], []
    for n in (16, 32, 64):
        sig = flow.time_sigmas(n)[:-1]  # stop at the last level > 0: no Euler jump to 0
        x_top = noise * den.prior_std(float(sig[0]))
        truth = gaussian_ode_solution(x_top, float(sig[0]), float(sig[-1]), 0.5, 0.3)
        errs.append((sample_heun(den, x_top, sig) - truth).abs().max().item())
        euler.append((sample(den, noise, sampler="euler", sigmas=sig).x - truth).abs().max().item())
        in_sigma = (sample_heun(den, x_top, sig, integrate_in="sigma") - truth).abs().max().item()
        assert in_sigma > euler[-1], (n, in_sigma, euler)  # the conditioning problem the default avoids
    for a, b in zip(errs, errs[1:]):
        assert 4 * 0.8 < a / b < 4 * 1.25, errs
    assert all(h < e / 10 for h, e in zip(errs, euler)), (errs, euler)
    with pytest.raises(ValueError, match="integrate_in"):
        sample_heun(den, x_top, sig, integrate_in="log")


def test_straightness_is_zero_for_straight_paths_and_positive_for_a_mixture():
    point = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    dirac = Denoiser(lambda x, s: point.expand_as(x), 0.002, 1e5)
    noise = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = flow.straightness(flow.denoiser_velocity(dirac), noise, steps=20)
    assert out["straightness"] < 1e-12 and torch.allclose(out["x0"], point.expand(500, 2), atol=1e-9)
    assert out["path"].shape == (21, 500, 2) and torch.equal(out["path"][0], noise)
    assert torch.equal(out["path"][-1], out["x0"])
    mixed = flow.straightness(flow.denoiser_velocity(mixture_denoiser(ring_of_gaussians())), noise, steps=50)
    assert mixed["relative"] > 0.02


TINY_FLOW = dict(data="ring8", family="flow", model={"kind": "mlp", "hidden": 32, "depth": 2}, batch_size=64,
                 steps=30, warmup=5)


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_flow_family_and_reflow_resume_bit_for_bit(tmp_path):
    teacher = Trainer(TrainConfig(**TINY_FLOW)).train(progress=False)
    teacher.export(tmp_path / "teacher.pt")
    for cfg in (TINY_FLOW, dict(TINY_FLOW, teacher=str(tmp_path / "teacher.pt"), pairs=256, teacher_nfe=5),
                dict(TINY_FLOW, teacher=str(tmp_path / "teacher.pt"), pairs=256, teacher_nfe=5, times="one")):
        config = TrainConfig(**cfg)
        straight = Trainer(config).train(progress=False)
        first = Trainer(config).train(steps=13, progress=False)
        first.save(tmp_path / "state.pt")
        torch.manual_seed(77)
        resumed = Trainer.resume(tmp_path / "state.pt").train(progress=False)
        assert _same(resumed.model, straight.model) and _same(resumed.ema, straight.ema)
        assert resumed.losses == straight.losses and len(straight.losses) == 30
    # reflow starts from the teacher's weights, plain flow matching from fresh ones
    fresh = Trainer(TrainConfig(**TINY_FLOW, seed=3))
    reflow = Trainer(TrainConfig(**dict(TINY_FLOW, seed=3, teacher=str(tmp_path / "teacher.pt"), pairs=64,
                                        teacher_nfe=3)))
    assert _same(reflow.model, teacher.ema) and not _same(fresh.model, teacher.ema)
    # a student of another size cannot start from the teacher's weights: it starts fresh (the pairs carry the teacher)
    wider = dict(TINY_FLOW, seed=3, teacher=str(tmp_path / "teacher.pt"), pairs=64, teacher_nfe=3,
                 model=dict(TINY_FLOW["model"], hidden=2 * TINY_FLOW["model"]["hidden"]))
    assert Trainer(TrainConfig(**wider)).model.config["hidden"] == 2 * TINY_FLOW["model"]["hidden"]
    with pytest.raises(ValueError, match="teacher"):
        TrainConfig(**TINY_FLOW, times="one")
    with pytest.raises(ValueError, match="times"):
        TrainConfig(**TINY_FLOW, times="beta")


def test_reflow_pairs_are_the_teachers_ode_solutions_and_training_lowers_the_loss():
    tr = Trainer(TrainConfig(**dict(TINY_FLOW, steps=300, lr=3e-3))).train(progress=False)
    assert sum(tr.losses[-50:]) / 50 < sum(tr.losses[:50]) / 50 - 0.2
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    pairs = flow.reflow_pairs(as_denoiser(tr.ema), noise, nfe=9)
    assert torch.allclose(pairs, sample(tr.ema, noise, sampler="heun", steps=5, spacing="uniform").x)


def test_the_likelihood_exercise_reference_agrees_with_the_library():
    from course_lib.exercises.lesson9 import _inputs_ll, ref_ode_log_likelihood

    inputs = _inputs_ll(torch.Generator().manual_seed(4))
    vel = inputs["velocity"]

    def model(x_t, t_in):  # the toy field as a flow network (time in the networks' units)
        return vel(x_t, float(t_in.flatten()[0]) / flow.TIME_SCALE)

    model.prediction = "flow"
    ours = likelihood.ode_log_likelihood(model, inputs["x"], rtol=1e-7, atol=1e-7)["log_p"]
    # the library integrates from t = 1e-4 to 1 - 1e-5 in log sigma; the reference from 0 to 1 by RK4 in t
    assert torch.allclose(ref_ode_log_likelihood(vel, inputs["x"], 200), ours, atol=2e-3)


def test_bench_flow_records_have_the_issue_keys_and_compare_like_with_like():
    from course_lib.bench import flow as bench
    from course_lib.bench.samplers import Judge

    runs = bench.plan(quick=True)
    assert {r["family"] for r in runs} == {"diffusion", "flow", "reflow"}
    # every family is sampled on the same budgets with the same solvers
    per = {f: {(r["sampler"], r["budget"]) for r in runs if r["family"] == f and not r["reference"]} for f in ("diffusion", "flow")}
    assert per["diffusion"] == per["flow"]
    # "auto" (tuned levels) only where the card has them: reflow was tuned for the samplers REFLOW_TUNED names
    from course_lib.checkpoints import load_pretrained
    assert set(load_pretrained("ring8_reflow").model.sampling) == set(bench.REFLOW_TUNED)
    full = bench.plan(datasets=["ring8"])
    assert {r["sampler"] for r in full if r["family"] == "reflow" and r["spacing"] == "auto"} == set(bench.REFLOW_TUNED)
    assert {r["sampler"] for r in full if r["family"] == "reflow" and r["spacing"] == "uniform"} == set(bench.SAMPLERS)
    judge, cache = Judge("ring8", 200), {}
    picked = [r for r in runs if r["budget"] == 10 and r["spacing"] == "auto"][:2] + [runs[0]]
    recs = [bench.run_sampling(r, judge, 200, cache) for r in picked]
    recs += bench.likelihood_records("ring8", quick=True) + bench.straightness_records("ring8", quick=True)
    for r in recs:
        if r["kind"] == "sample":
            assert {"dataset", "family", "sampler", "nfe", "hq_fraction", "modes_covered", "seconds"} <= set(r)
            assert r["nfe"] == (100 if r["reference"] else 10) or r["sampler"] == "heun"
    nll = {(r["family"], r["method"]): r for r in recs if r["kind"] == "nll"}
    assert {("data", "true density"), ("diffusion", "ode"), ("flow", "ode"), ("diffusion", "variational bound")} <= set(nll)
    assert all(abs(nll[(f, "ode")]["gap_to_true"]) < 0.5 for f in ("diffusion", "flow"))
    assert bench.verdict(recs)  # lines for whatever the records hold


def test_the_verdict_compares_the_three_families_at_the_largest_budget_they_share():
    import copy
    import json

    from course_lib.bench import flow as bench
    from course_lib.checkpoints import shipped_dir

    records = json.loads((shipped_dir() / "bench_flow.json").read_text())
    line = next(x for x in bench.verdict(records) if "best of each: diffusion" in x and "reflow" in x)
    top = max(r["budget"] for r in bench.summarize(records) if r["family"] == "reflow" and r["dataset"] == "ring8")
    assert line.startswith(f"ring8 at {top} NFE")  # not the 1,000-step reference, which only diffusion has
    best = {f: bench.best_at(records, "ring8", f, top)["mean"] for f in ("diffusion", "flow", "reflow")}
    assert ("tops out below both" in line) == (best["reflow"] < min(best["diffusion"], best["flow"]))
    lifted = copy.deepcopy(records)  # the same records with reflow raised above both: the sentence turns
    for r in lifted:
        if r.get("family") == "reflow" and r["dataset"] == "ring8" and "hq_fraction" in r:
            r["hq_fraction"] = min(1.0, r["hq_fraction"] + 0.05)
    line = next(x for x in bench.verdict(lifted) if "best of each: diffusion" in x and "reflow" in x)
    assert "keeps up with them" in line


def test_the_digits_likelihood_records_hold_the_clipped_bound_below_the_unclipped_one():
    from course_lib.bench import flow as bench

    recs = {(r["family"], r["method"]): r for r in bench.likelihood_records("digits", quick=True)}
    plain, clipped = recs[("diffusion", "variational bound")], recs[("diffusion", "variational bound, x0 clipped")]
    # clipping x0 to the data range can only lower each term for data inside it (lesson 4); the top steps' blow-up goes
    assert clipped["nll"] < plain["nll"] and clipped["unit"] == plain["unit"] == "bits/dim"
    assert clipped["nll"] < math.log2(17)  # below a uniform guess over the 17 grey levels
    lines = bench.verdict(list(recs.values()))
    assert any("with its x0 estimate clipped" in line for line in lines)
    assert not any("target" in line or " met" in line for line in lines)


def test_bench_flow_reruns_one_dataset_and_keeps_the_others_records(tmp_path, monkeypatch):
    from course_lib.bench import flow as bench

    path = tmp_path / "bench_flow.json"
    def rec(dataset, family, hq):
        return {"kind": "sample", "dataset": dataset, "family": family, "sampler": "euler", "spacing": "uniform",
                "budget": 2, "nfe": 2, "seed": 0, "hq_fraction": hq, "modes_covered": 8}

    old = [rec("ring8", "reflow", 0.1), rec("grid25", "flow", 0.9),
           {"kind": "nll", "dataset": "grid25", "family": "flow", "method": "ode", "nll": 1.0, "unit": "nats"}]
    path.write_text(json.dumps(old))
    ran = []

    def fake(quick, samples, datasets=None):
        ran.append(datasets)
        return [{"kind": "nll", "dataset": "ring8", "family": "flow", "method": "ode", "nll": 2.0, "unit": "nats"},
                rec("ring8", "reflow", 0.9)]

    monkeypatch.setattr(bench, "bench_flow", fake)
    with pytest.raises(ValueError, match="pass --force"):
        bench.main_flow(json_path=path, datasets=["ring8"])  # an existing file is replaced only with force
    assert json.loads(path.read_text()) == old
    bench.main_flow(json_path=path, force=True, datasets=["ring8"])
    got = json.loads(path.read_text())
    assert ran == [["ring8"]]
    assert [(r["kind"], r["dataset"]) for r in got] == [("sample", "ring8"), ("sample", "grid25"), ("nll", "ring8"),
                                                        ("nll", "grid25")]  # the full run's order
    assert got[0]["hq_fraction"] == 0.9 and old[1] in got and old[2] in got  # ring8 replaced, grid25 kept
    with pytest.raises(ValueError, match="datasets must be among"):
        bench.main_flow(json_path=path, force=True, datasets=["moons"])


def test_the_shipped_flow_models_sample_well_and_reflow_is_straighter():
    from course_lib.checkpoints import load_pretrained
    from course_lib.metrics import hq_fraction, modes_covered

    ring = ring_of_gaussians()
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    p = load_pretrained("ring8_flow")
    assert p.schedule is None and p.model.sampling  # tuned noise levels from its card, like the diffusion models
    x = sample(p.model, noise, sampler="dpmpp_2m", steps=10).x
    assert hq_fraction(x, ring) > 0.9 and modes_covered(x, ring) == 8  # measured 0.96
    straight = {}
    for name in ("ring8_flow", "ring8_reflow"):
        d = as_denoiser(load_pretrained(name).model)
        straight[name] = flow.straightness(flow.denoiser_velocity(d), noise[:300], steps=30, t_max=0.99)["relative"]
    assert straight["ring8_reflow"] < straight["ring8_flow"] / 20  # measured: about 1,000 times straighter
    reflow = load_pretrained("ring8_reflow").model  # few steps: the default call, Euler on the card's tuned levels
    assert reflow.recommended_sampler["2"] == "euler" and reflow.sampling["euler"]["2"]
    x = sample(reflow, noise, steps=2).x
    assert hq_fraction(x, ring) > 0.9 and modes_covered(x, ring) == 8  # the benchmark: 0.953 +- 0.006 (2,000 x 3)
    one = load_pretrained("ring8_distilled").model  # the one-step model, trained at t = 1 only
    x = sample(one, noise, sampler="euler", steps=1, spacing="uniform").x
    assert hq_fraction(x, ring) > 0.9 and modes_covered(x, ring) == 8  # the benchmark: 0.957 +- 0.006


@pytest.mark.parametrize("kind", ["uniform", "logit_normal"])
def test_training_times_follow_their_densities(kind):
    # the empirical CDF at nine points against the CDF integrated numerically from each density (independent of the
    # samplers' inverse-CDF formulas), within 4 standard errors of a share of 40,000 draws
    n = 40_000
    t = flow.sample_times(n, kind, torch.Generator().manual_seed(0)).double()
    grid = torch.linspace(1e-6, 1 - 1e-6, 200_001, dtype=torch.float64)
    density = {"uniform": torch.ones_like(grid),
               "logit_normal": torch.exp(-0.5 * torch.logit(grid) ** 2) / (grid * (1 - grid))}[kind]
    cdf = torch.cumulative_trapezoid(density, grid)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cdf / cdf[-1]])
    for q in torch.linspace(0.1, 0.9, 9, dtype=torch.float64):
        want = float(cdf[torch.searchsorted(grid, q)])
        got = float((t <= q).double().mean())
        assert abs(got - want) < 4 * (want * (1 - want) / n) ** 0.5 + 1e-4, (kind, float(q), got, want)
    assert t.min() >= 0 and t.max() <= 1
