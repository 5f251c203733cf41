"""DDPM ancestral sampling against a Gaussian target whose exact model is known."""
import math

import pytest
import torch

from course_lib import samplers as S
from course_lib.analytic import (
    gaussian_denoiser,
    gaussian_eps_model,
    gaussian_ode_solution,
    mixture_denoiser,
)
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


# ---------------------------------------------------------------------------------------------------------------
# The sampler interface (issue 4): exact answers on a Gaussian target, orders, NFE, diffusers, bad input


ODE_SAMPLERS = ("ddim", "euler", "heun", "dpmpp_2m")


def _z(n=N, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", ODE_SAMPLERS)
def test_ode_samplers_follow_the_closed_form_flow(name):
    # for N(m, s^2) the probability-flow ODE is solved in closed form; deterministic samplers must land on it
    sd, mean, sigmas = 0.5, 0.3, S.karras_sigmas(200, 0.002, 80.0)
    z = _z()
    x = S.sample(gaussian_denoiser(sd, mean), z, sampler=name, sigmas=sigmas).x
    x_start = z * math.sqrt(1 + 80.0**2)
    exact = gaussian_ode_solution(x_start, 80.0, 0.0, sd, mean)
    tol = 2e-3 if name in ("heun", "dpmpp_2m") else 6e-2  # 2nd vs 1st order at 200 steps (measured: 7.6e-4, 3.0e-2)
    assert (x - exact).abs().max().item() < tol
    assert (x - exact).abs().max().item() > 0  # a real numerical solution, not the formula


@pytest.mark.parametrize("name", ["ddpm", "euler_ancestral"])
@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_stochastic_samplers_hit_the_target_moments(name, sd):
    x = S.sample(gaussian_denoiser(sd, 0.3), _z(), sampler=name, steps=1000, spacing="karras",
                 generator=torch.Generator().manual_seed(1)).x
    se_mean, se_var = sd / math.sqrt(2 * N), math.sqrt(2 / (2 * N))  # 10,000 points in 2D
    assert abs(x.mean().item() - 0.3) < 5 * se_mean
    assert abs(x.var().item() / sd**2 - 1) < 5 * se_var + 0.01  # + Euler ancestral's bias at 1,000 steps (0.3%)


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order_on_a_gaussian_target(name, order):
    # halving the step divides the error by 2^order (Karras sigmas, stopping at sigma_min so no Euler jump to 0)
    z, sd = _z(1000), 0.5
    errs = []
    for n in (32, 64, 128):
        sig = S.karras_sigmas(n, 0.01, 80.0)[:-1]
        x0 = z * math.sqrt(sd**2 + 80.0**2)
        x = S.SAMPLERS[name](gaussian_denoiser(sd), x0, sig)
        errs.append((x - gaussian_ode_solution(x0, 80.0, float(sig[-1]), sd)).abs().max().item())
    for a, b in zip(errs, errs[1:]):
        assert 2**order * 0.85 < a / b < 2**order * 1.2, errs


def test_dpmpp_3m_is_more_accurate_than_2m_and_samples_the_target():
    # at eta = 0 the 3M update is an ODE solver: on a Gaussian target its error is 4-10x below 2M's at every step
    # count and it converges (its first two steps are lower order, so the measured order wanders: 16 -> 64 steps, 13x)
    z, sd = _z(1000), 0.5
    errs = {}
    for name, kw in (("dpmpp_2m", {}), ("dpmpp_3m_sde", {"eta": 0.0})):
        for n in (16, 32, 64):
            sig = S.karras_sigmas(n, 0.01, 80.0)[:-1]
            x0 = z * math.sqrt(sd**2 + 80.0**2)
            x = S.SAMPLERS[name](gaussian_denoiser(sd), x0, sig, **kw)
            errs[name, n] = (x - gaussian_ode_solution(x0, 80.0, float(sig[-1]), sd)).abs().max().item()
    for n in (16, 32, 64):
        assert errs["dpmpp_3m_sde", n] < errs["dpmpp_2m", n] / 3, errs
    assert errs["dpmpp_3m_sde", 16] > errs["dpmpp_3m_sde", 32] > errs["dpmpp_3m_sde", 64] > 0, errs
    assert errs["dpmpp_3m_sde", 16] / errs["dpmpp_3m_sde", 64] > 10, errs
    # at eta = 1 it samples the reverse SDE: the target's moments
    x = S.sample(gaussian_denoiser(sd, 0.3), _z(), sampler="dpmpp_3m_sde", sigmas=S.karras_sigmas(200, 0.002, 80.0),
                 generator=torch.Generator().manual_seed(1)).x
    se_mean, se_var = sd / math.sqrt(2 * N), math.sqrt(2 / (2 * N))
    assert abs(x.mean().item() - 0.3) < 5 * se_mean and abs(x.var().item() / sd**2 - 1) < 5 * se_var
    with pytest.raises(ValueError, match="eta"):
        S.sample(gaussian_denoiser(sd), _z(4), sampler="dpmpp_3m_sde", sigmas=S.karras_sigmas(5, 0.01, 80.0), eta=-1)


def test_dpmpp_2m_drops_to_first_order_where_its_extrapolation_is_unstable():
    # r = h_prev / h: the correction weighs D - D_prev by 1 / (2r); below R_MIN, and on the step before the final
    # jump to 0, the step is DDIM's
    sig = torch.tensor([10.0, 5.0, 4.0, 0.1, 0.05, 0.0], dtype=torch.float64)
    h = lambda i: math.log(sig[i] / sig[i + 1])
    assert S._second_order_ok(sig, 1, h(0) / h(1)) and not S._second_order_ok(sig, 2, h(1) / h(2))  # r = 0.06
    assert not S._second_order_ok(sig, 3, h(2) / h(3))  # the last step before sigma = 0 (r = 5.3)
    assert S._second_order_ok(sig[:-1], 3, h(2) / h(3))  # no final jump: second order to the end
    # on a Gaussian target, with uniform spacing that ends in a long jump, it is no worse than DDIM on the same levels
    s = NoiseSchedule.named("linear", 1000)
    model, z, sd = gaussian_eps_model(s, 0.05), _z(2000), 0.05
    exact = lambda x_start: gaussian_ode_solution(x_start, float(s.sigmas[-1]), 0.0, sd)
    x_start = z * math.sqrt(1 + float(s.sigmas[-1]) ** 2)
    errs = {name: (S.sample(model, z, s, name, steps=10, spacing="uniform").x - exact(x_start)).abs().mean().item()
            for name in ("ddim", "dpmpp_2m")}
    assert errs["dpmpp_2m"] <= errs["ddim"], errs


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_dpmpp_2m_sde_samples_the_target_and_is_the_ode_solver_at_eta_0(sd):
    sig = S.karras_sigmas(200, 0.002, 80.0)
    x = S.sample(gaussian_denoiser(sd, 0.3), _z(), sampler="dpmpp_2m_sde", sigmas=sig,
                 generator=torch.Generator().manual_seed(1)).x
    se_mean, se_var = sd / math.sqrt(2 * N), math.sqrt(2 / (2 * N))
    assert abs(x.mean().item() - 0.3) < 5 * se_mean and abs(x.var().item() / sd**2 - 1) < 5 * se_var
    ode = S.sample(gaussian_denoiser(sd, 0.3), _z(), sampler="dpmpp_2m", sigmas=sig).x
    sde0 = S.sample(gaussian_denoiser(sd, 0.3), _z(), sampler="dpmpp_2m_sde", sigmas=sig, eta=0.0).x
    torch.testing.assert_close(sde0, ode, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="eta"):
        S.sample(gaussian_denoiser(sd), _z(4), sampler="dpmpp_2m_sde", sigmas=sig, eta=1.5)


def test_the_default_uses_the_models_tuned_noise_levels_or_says_it_has_none():
    s = NoiseSchedule.named("linear", 1000)
    model, z = gaussian_eps_model(s, 0.5), _z(8)
    res = S.sample(model, z, s, steps=10)
    assert "not tuned" in res.spacing
    torch.testing.assert_close(res.sigmas, S.karras_sigmas(10, float(s.sigmas[0]), float(s.sigmas[-1])))
    model.sampling = {"dpmpp_2m": {"5": {"sigma_min": 0.05, "sigma_max": 2.0, "rho": 3.0},
                                   "20": {"sigma_min": 0.01, "sigma_max": 9.0, "rho": 7.0}}}
    res = S.sample(model, z, s, steps=8)  # 8 is nearer 5 than 20 in log NFE
    assert "tuned" in res.spacing and res.sigmas[0].item() == pytest.approx(2.0)
    torch.testing.assert_close(res.sigmas, S.karras_sigmas(8, 0.05, 2.0, 3.0))
    assert S.sample(model, z, s, steps=14).sigmas[0].item() == pytest.approx(9.0)
    assert "not tuned" in S.sample(model, z, s, "euler", steps=10).spacing  # tuned for another sampler only
    assert S.sample(model, z, s, steps=10, spacing="uniform").spacing == "uniform"


def test_the_default_sampler_is_the_cards_choice_at_the_nearest_budget():
    from course_lib.step_schedules import DEFAULT_SAMPLER, recommended_sampler

    s = NoiseSchedule.named("linear", 1000)
    model, z = gaussian_eps_model(s, 0.5), _z(64)
    assert DEFAULT_SAMPLER == "dpmpp_2m" and recommended_sampler(None, 10) == "dpmpp_2m"
    torch.testing.assert_close(S.sample(model, z, s, steps=10).x, S.sample(model, z, s, "dpmpp_2m", steps=10).x)
    model.recommended_sampler = {"5": "euler", "20": "dpmpp_3m_sde"}
    assert recommended_sampler(model.recommended_sampler, 7) == "euler"  # 7 is nearer 5 than 20 in log NFE
    torch.testing.assert_close(S.sample(model, z, s, steps=6).x, S.sample(model, z, s, "euler", steps=6).x)
    g = lambda: torch.Generator().manual_seed(3)
    torch.testing.assert_close(S.sample(model, z, s, steps=16, generator=g()).x,
                               S.sample(model, z, s, "dpmpp_3m_sde", steps=16, generator=g()).x)
    sig = S.karras_sigmas(4, 0.05, 5.0)  # with sigmas (4 steps) or timesteps the budget is their count
    torch.testing.assert_close(S.sample(model, z, s, sigmas=sig).x, S.sample(model, z, s, "euler", sigmas=sig).x)
    assert not torch.equal(S.sample(model, z, s, steps=6).x, S.sample(model, z, s, "dpmpp_2m", steps=6).x)
    den = S.as_denoiser(model, s)  # a Denoiser carries the choice, also when re-wrapped with a clip
    assert den.recommended == model.recommended_sampler and S.as_denoiser(den, clip=1.0).recommended == den.recommended


def test_the_tune_command_chooses_the_default_sampler_on_tuning_noise(tmp_path, monkeypatch):
    """`tune --recommend-only` scores every sampler on its tuned levels on the same tuning noise and stores the best
    in the card; a sampler given hopeless levels is never chosen, and load_pretrained hands the choice to sample."""
    import shutil

    from course_lib.bench import samplers as bench
    from course_lib.checkpoints import load_pretrained, shipped_dir, update_card
    from course_lib.cli import main

    for name in ("ring8.pt", "ring8.json"):
        shutil.copy(shipped_dir() / name, tmp_path / name)
    monkeypatch.setenv("COURSE_CHECKPOINTS", str(tmp_path))
    good = load_pretrained("ring8").card["sampling"]["dpmpp_2m"]["10"]
    update_card(tmp_path / "ring8.pt", sampling={"dpmpp_2m": {"10": good},  # euler: all ten steps near sigma 0.02
                                                 "euler": {"10": {"sigma_min": 0.01, "sigma_max": 0.02, "rho": 7.0}}})
    assert main(["tune", "--preset", "ring8", "--recommend-only", "--samples", "400"]) == 0
    card = load_pretrained("ring8").card
    assert card["recommended_sampler"] == {"10": "dpmpp_2m"}
    scores = card["recommended_sampler_scores"]["scores"]["10"]
    assert scores["dpmpp_2m"] > 0.8 > scores["euler"]
    assert bench.default_sampler("ring8") == "dpmpp_2m" and load_pretrained("ring8").model.recommended_sampler
    # tuning one more sampler keeps the others and the record of how they were tuned, and chooses again
    before = card["sampling_tuning"]["command"]
    import functools

    from course_lib import step_schedules
    monkeypatch.setattr(step_schedules, "SIGMA_MAX_GRID", (0.5, 1.5))  # a small search: this checks the bookkeeping
    monkeypatch.setattr(step_schedules, "SIGMA_MIN_GRID", (0.02, 0.05))
    monkeypatch.setattr(step_schedules, "tune_karras", functools.partial(step_schedules.tune_karras, refine=4))
    assert main(["tune", "--preset", "ring8", "--samplers", "euler", "--nfe", "5", "--samples", "400"]) == 0
    card = load_pretrained("ring8").card
    assert card["sampling"]["dpmpp_2m"]["10"] == good and card["sampling"]["euler"]["5"]["samples"] == 400
    assert card["sampling_tuning"]["command"] == before + " && python -m course_lib tune --preset ring8 --samplers " \
        "euler --nfe 5 --samples 400"
    assert card["recommended_sampler"]["5"] == "euler" and card["recommended_sampler"]["10"] == "dpmpp_2m"
    update_card(tmp_path / "ring8.pt", sampling={})
    assert main(["tune", "--preset", "ring8", "--recommend-only"]) == 2  # nothing tuned: a clear error


def test_tuning_beats_the_whole_range_on_noise_it_never_saw():
    """tune_karras on the exact denoiser of the ring of 8 (modes 0.05 wide) at 5 steps, scored on other noise."""
    from course_lib.data import ring_of_gaussians
    from course_lib.metrics import hq_fraction
    from course_lib.step_schedules import tune_karras

    ring = ring_of_gaussians()
    den = mixture_denoiser(ring)
    run = lambda z: lambda sig: S.sample(den, z, sampler="dpmpp_2m", sigmas=sig).x
    tune_z, eval_z = _z(1000, seed=1), _z(4000, seed=2)
    tuned = tune_karras(run(tune_z), lambda x: hq_fraction(x, ring), steps=5, refine=20)
    assert tuned["evaluations"] > 50 and set(tuned) >= {"sigma_min", "sigma_max", "rho", "score"}
    good = hq_fraction(run(eval_z)(S.karras_sigmas(5, tuned["sigma_min"], tuned["sigma_max"], tuned["rho"])), ring)
    wide = hq_fraction(run(eval_z)(S.karras_sigmas(5, 0.002, 80.0)), ring)
    assert good > wide + 0.1, (good, wide)  # 4,000 points: a standard error under 0.01


def test_few_step_tuning_searches_high_interior_levels():
    """With three steps or fewer the grid reaches sigma_min = 5 (a reflowed flow's best middle level is far up): a
    score peaked at a middle level of 3.5 gets the grid's nearest value, 5, from the grid alone, and Powell refines it
    towards 3.5; with five steps the old grid's top, 0.1, is the nearest it can get."""
    from course_lib.step_schedules import SIGMA_MIN_GRID, tune_karras

    def score(levels):
        return -abs(math.log(float(levels[1]) / 3.5))  # the run hands back its levels: the best middle level is 3.5

    grid_only = tune_karras(lambda sig: sig, score, steps=2, refine=0)
    assert grid_only["sigma_min"] == 5.0 > max(SIGMA_MIN_GRID)
    refined = tune_karras(lambda sig: sig, score, steps=2, refine=40)
    assert abs(math.log(refined["sigma_min"] / 3.5)) < abs(math.log(5.0 / 3.5))
    five = tune_karras(lambda sig: sig, lambda lv: -abs(math.log(float(lv[-2]) / 3.5)), steps=5, refine=0)
    assert five["sigma_min"] == max(SIGMA_MIN_GRID)  # more steps: the usual grid, unchanged


def test_ddim_is_euler_and_ddim_eta1_is_ddpm_with_beta_tilde():
    s = NoiseSchedule.named("linear", 1000)
    model, z = gaussian_eps_model(s, 0.5), _z(2000)
    ddim = S.sample(model, z, s, "ddim", steps=20, spacing="trailing").x
    euler = S.sample(model, z, s, "euler", steps=20, spacing="trailing").x
    torch.testing.assert_close(ddim, euler, rtol=1e-9, atol=1e-9)  # Karras et al. 2022, sec. 4: DDIM = Euler in sigma
    a = S.sample(model, z, s, "ddim", steps=20, generator=torch.Generator().manual_seed(3), eta=1.0).x
    b = S.sample(model, z, s, "ddpm", steps=20, generator=torch.Generator().manual_seed(3), variance="posterior").x
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    c = S.sample(model, z, s, "ddpm", steps=20, generator=torch.Generator().manual_seed(3), variance="beta").x
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(S.SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_nfe_is_counted(name, steps):
    s = NoiseSchedule.named("cosine", 1000)
    calls = []

    def model(x, t):
        calls.append(1)
        return torch.zeros_like(x)

    model.prediction = "eps"
    res = S.sample(model, _z(4), s, name, steps=steps, spacing="uniform", generator=torch.Generator().manual_seed(0))
    assert res.nfe == len(calls) == S.nfe_for_steps(name, steps)
    assert S.steps_for_nfe(name, res.nfe) == steps  # the inverse: the most steps that fit in that budget
    assert len(res.sigmas) == steps + 1 and res.sigmas[-1] == 0
    # ending above sigma = 0, Heun also corrects its last step
    sig = torch.tensor([3.0, 1.0, 0.5])
    assert S.sample(gaussian_denoiser(1.0), _z(4), sampler=name, sigmas=sig,
                    generator=torch.Generator().manual_seed(0)).nfe == {"heun": 4, "consistency": 3}.get(name, 2)
    # (a consistency model maps to data at every level it visits: levels that do not end at 0 are each one call)


def test_spacings_golden_values():
    s = NoiseSchedule.named("linear", 1000)
    assert S.trailing_timesteps(s, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert S.leading_timesteps(s, 10) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert S.uniform_timesteps(s, 4) == [999, 666, 333, 0]
    k = S.karras_sigmas(5, 0.002, 80.0)
    assert k[0].item() == pytest.approx(80.0) and k[-2].item() == pytest.approx(0.002) and k[-1] == 0
    assert (k[:-1].diff() < 0).all()
    torch.testing.assert_close(S.karras_sigmas(5, 1.0, 5.0, rho=1.0)[:-1], torch.linspace(5, 1, 5, dtype=torch.float64))
    for spacing in S.SPACINGS:
        sig = S.get_sigmas(10, spacing, s)
        assert len(sig) == 11 and sig[-1] == 0 and (sig.diff() < 0).all()
    assert S.get_sigmas(10, "uniform", s)[0].item() == pytest.approx(s.sigmas[-1].item())


def test_sigma_to_t_and_adapters_round_trip():
    s = NoiseSchedule.named("linear", 1000)
    for t in (0, 1, 500, 999):
        assert S.sigma_to_t(s, float(s.sigmas[t])) == pytest.approx(t, abs=1e-6)
    mid = S.sigma_to_t(s, float((s.sigmas[10] * s.sigmas[11]).sqrt()))
    assert 10 < mid < 11
    # a Denoiser seen as an eps model on the schedule is the exact Gaussian eps model, and back again
    x, t = _z(8), torch.full((8,), 300)
    eps = S.as_model(gaussian_denoiser(0.5), s, "eps")(x, t)
    torch.testing.assert_close(eps, gaussian_eps_model(s, 0.5)(x, t))
    den = S.as_denoiser(gaussian_eps_model(s, 0.5), s)
    sigma = float(s.sigmas[300])
    torch.testing.assert_close(den(x, sigma), gaussian_denoiser(0.5)(x, sigma))
    assert den.nfe == 1 and S.as_denoiser(den) is den
    clipped = S.as_denoiser(den, clip=0.1)
    assert clipped.clip == 0.1 and den.clip is None  # the caller's denoiser is not changed
    assert clipped(x * 100, sigma).abs().max() <= 0.1
    for pred in ("x0", "v"):
        other = S.as_denoiser(S.as_model(gaussian_denoiser(0.5), s, pred), s)
        torch.testing.assert_close(other(x, sigma), gaussian_denoiser(0.5)(x, sigma))


def test_mixture_denoiser_is_exact_at_the_ends_and_samples_the_mixture():
    from course_lib.data import ring_of_gaussians
    from course_lib.metrics import hq_fraction, hq_fraction_expected, modes_covered

    mix = ring_of_gaussians()
    den = mixture_denoiser(mix)
    x = mix.sample(500, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(den(x, 1e-4), x, atol=1e-5, rtol=0)  # no noise: nothing to remove
    far = den(torch.zeros(3, 2, dtype=torch.float64) + 1e-3, 1e4)  # all noise: the data mean (0)
    assert far.abs().max() < 1e-3
    out = S.sample(den, _z(2000), sampler="ddpm", steps=200, spacing="karras",
                   generator=torch.Generator().manual_seed(1)).x
    se = math.sqrt(0.011 * 0.989 / 2000)  # binomial standard error of the high-quality fraction
    assert abs(hq_fraction(out, mix) - hq_fraction_expected()) < 5 * se + 0.005
    assert modes_covered(out, mix) == 8


def test_trajectories_are_in_the_alpha_bar_view():
    s = NoiseSchedule.named("linear", 1000)
    z = _z(16)
    for name in S.SAMPLERS:
        res = S.sample(gaussian_eps_model(s, 0.5), z, s, name, steps=5, return_trajectory=True,
                       generator=torch.Generator().manual_seed(0))
        assert res.trajectory.shape == (6, 16, 2)
        torch.testing.assert_close(res.trajectory[0], z)  # x_T = the noise itself
        torch.testing.assert_close(res.trajectory[-1], res.x)


def test_bad_input_gives_clear_errors():
    s = NoiseSchedule.named("linear", 1000)
    model, z = gaussian_eps_model(s, 1.0), _z(4)
    for bad, msg in [([], "at least 2"), ([1.0], "at least 2"), ([1.0, 2.0, 0.0], "decreasing"),
                     ([2.0, 1.0, -1.0], ">= 0"), ([float("nan"), 0.0], "finite")]:
        with pytest.raises(ValueError, match=msg):
            S.sample(model, z, s, "euler", sigmas=bad)
    with pytest.raises(TypeError, match="sigmas"):
        S.check_sigmas("1, 0")
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        S.sample(model, z, s, "plms", steps=10)
    with pytest.raises(ValueError, match="spacing"):
        S.sample(model, z, s, "euler", steps=10, spacing="cosine")
    with pytest.raises(ValueError, match="exactly one"):
        S.sample(model, z, s, "euler", steps=10, sigmas=[1.0, 0.0])
    with pytest.raises(ValueError, match="exactly one"):
        S.sample(model, z, s, "euler")
    with pytest.raises(ValueError, match="steps"):
        S.sample(model, z, s, "euler", steps=0)
    with pytest.raises(TypeError, match="no option"):
        S.sample(model, z, s, "euler", steps=10, eta=1.0)
    with pytest.raises(ValueError, match="NoiseSchedule"):
        S.sample(gaussian_denoiser(1.0), z, sampler="euler", steps=10, spacing="trailing")
    with pytest.raises(TypeError, match="NoiseSchedule"):
        S.sample(model, z, None, "euler", steps=10)
    with pytest.raises(TypeError, match="noise"):
        S.sample(model, [[0.0, 0.0]], s, "euler", steps=10)
    with pytest.raises(ValueError, match="returned shape"):
        S.sample(S.Denoiser(lambda x, sigma: x[:, :1]), z, sampler="euler", sigmas=[1.0, 0.0])
    from course_lib.nets import TimeMLP
    with pytest.raises(ValueError, match="shape"):  # 3-D points into a 2-D model
        S.sample(TimeMLP(2, hidden=16, depth=1), torch.zeros(4, 3), s, "heun", steps=3)
    with pytest.raises(FloatingPointError, match="non-finite"):
        S.sample(S.Denoiser(lambda x, sigma: x * float("nan")), z, sampler="euler", sigmas=[1.0, 0.0])
    with pytest.raises(ValueError, match="eta"):
        S.sample(model, z, s, "ddim", steps=3, eta=-1.0)


# cross-check against an independent implementation: diffusers' schedulers, same model, same noise, same timesteps

def _diffusers_run(scheduler, model, z, n):
    scheduler.set_timesteps(n)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t.expand(len(x)))
        x = scheduler.step(out, t, x).prev_sample
    return x, scheduler.timesteps


@pytest.mark.parametrize("kind,spacing,extra", [
    ("ddim", "leading", {}), ("ddim", "trailing", {}),
    ("euler", "linspace", {}), ("euler", "trailing", {}), ("euler", "linspace", {"use_karras_sigmas": True}),
    ("dpmpp_2m", "trailing", {}), ("dpmpp_2m", "linspace", {}),
])
def test_matches_diffusers(kind, spacing, extra):
    diffusers = pytest.importorskip("diffusers")  # a test-only dependency, in the [test] extra
    from course_lib.checkpoints import load_pretrained

    p = load_pretrained("ring8")
    kw = dict(num_train_timesteps=1000, trained_betas=p.schedule.betas.float().numpy())
    sched = {"ddim": lambda: diffusers.DDIMScheduler(clip_sample=False, timestep_spacing=spacing, **kw),
             "euler": lambda: diffusers.EulerDiscreteScheduler(timestep_spacing=spacing, **kw, **extra),
             "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing, **kw)}[kind]()
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    theirs, ts = _diffusers_run(sched, p.model, z, 10)
    if extra.get("use_karras_sigmas"):
        sig = torch.cat([torch.as_tensor(sched.sigmas[:-1], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
        torch.testing.assert_close(sig[:-1], S.karras_sigmas(10, float(p.schedule.sigmas[0]), float(p.schedule.sigmas[-1]))[:-1],
                                   rtol=1e-4, atol=0)  # diffusers keeps sigmas in float32
        ours = S.sample(p.model, z, p.schedule, kind, steps=10, spacing="karras",
                        **({"stable": False} if kind == "dpmpp_2m" else {})).x
    else:
        options = {"stable": False} if kind == "dpmpp_2m" else {}  # diffusers runs the plain Algorithm 2
        ours = S.sample(p.model, z, p.schedule, kind, timesteps=ts.long().tolist(), **options).x
        if spacing in ("leading", "trailing"):  # and our spacings pick diffusers' timesteps
            assert ts.long().tolist() == getattr(S, f"{spacing}_timesteps")(p.schedule, 10)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-3, atol=1e-3)


def test_update_card_changes_the_card_and_its_sidecar_but_not_the_weights(tmp_path):
    import shutil

    from course_lib.checkpoints import load_checkpoint, load_pretrained, shipped_dir, update_card

    path = tmp_path / "ring8.pt"
    shutil.copy(shipped_dir() / "ring8.pt", path)
    shutil.copy(shipped_dir() / "ring8.json", tmp_path / "ring8.json")
    before = load_checkpoint(path)
    tuned = {"dpmpp_2m": {"10": {"sigma_min": 0.1, "sigma_max": 3.0, "rho": 5.0}}}
    card = update_card(path, sampling=tuned)
    after = load_checkpoint(path)
    assert card["sampling"] == tuned and after["card"]["sampling"] == tuned
    assert after["card"]["preset"] == before["card"]["preset"]  # the other fields are kept
    import json
    assert json.loads((tmp_path / "ring8.json").read_text())["sampling"] == tuned
    weights = before["weights"]
    assert weights and _flat(weights).keys() == _flat(after["weights"]).keys()
    assert all(torch.equal(v, _flat(after["weights"])[k]) for k, v in _flat(weights).items())
    assert load_pretrained(path).model.sampling == tuned


def _flat(tree, prefix=""):
    """{path: tensor} of a nested dict of tensors (a checkpoint's weights)."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    return {k2: v2 for k, v in tree.items() for k2, v2 in _flat(v, f"{prefix}.{k}").items()}
