"""Lesson 11's library: EDM's preconditioning, training noise, loss weighting and loss (course_lib.edm, the edm family,
nets.EDMPrecond), EDM2's power EMA and its post-hoc reconstruction (course_lib.posthoc_ema), zero terminal SNR.
Each is checked against an independent derivation: closed forms on Gaussian data, numerical integrals, the discrete
diffusion loss of lesson 2."""
import math

import pytest
import torch

from course_lib import edm, posthoc_ema
from course_lib.analytic import gaussian_denoiser
from course_lib.losses import diffusion_loss, snr_weight
from course_lib.nets import EDMPrecond, build_model
from course_lib.samplers import as_denoiser, sample
from course_lib.schedules import NoiseSchedule
from course_lib.train import TrainConfig, Trainer

TINY_EDM = dict(data="ring8", family="edm", model={"kind": "mlp", "hidden": 32, "depth": 2}, batch_size=64, steps=40,
                warmup=5)


@pytest.mark.parametrize("sigma_data", [0.5, 0.75, 1.7])
def test_preconditioning_gives_unit_variance_in_and_out_on_gaussian_data(sigma_data):
    """EDM's derivation (app. B.6): Var(c_in x) = 1 and Var((x0 - c_skip x) / c_out) = 1 at every sigma. Checked by
    Monte Carlo on 400,000 draws (the sample variance of a unit-variance normal has standard error sqrt(2/n) = 0.0022:
    a 1.5% tolerance is 7 standard errors)."""
    g = torch.Generator().manual_seed(0)
    for sigma in (0.002, 0.1, 0.5, 2.0, 80.0):
        x0 = sigma_data * torch.randn(400_000, generator=g, dtype=torch.float64)
        n = torch.randn(400_000, generator=g, dtype=torch.float64)
        c_skip, c_out, c_in, c_noise = edm.preconditioning(torch.tensor(sigma, dtype=torch.float64), sigma_data)
        x = x0 + sigma * n
        assert float((c_in * x).var()) == pytest.approx(1.0, rel=0.015)
        assert float(((x0 - c_skip * x) / c_out).var()) == pytest.approx(1.0, rel=0.015)
        assert float(c_noise) == pytest.approx(math.log(sigma) / 4)
        target = edm.training_target(x0[:, None], n[:, None], torch.full((400_000,), sigma, dtype=torch.float64),
                                     sigma_data)
        assert torch.allclose(target.flatten(), (x0 - c_skip * x) / c_out)


def test_with_a_zero_network_the_edm_denoiser_is_the_exact_denoiser_of_gaussian_data():
    """For x0 ~ N(0, sigma_data^2) the posterior mean is sigma_data^2 / (sigma_data^2 + sigma^2) x = c_skip x: the
    skip connection alone is already optimal, F = 0 (analytic.gaussian_denoiser, an independent closed form)."""
    net = EDMPrecond({"kind": "mlp", "dim": 2, "hidden": 8, "depth": 1}, sigma_data=0.8)
    for p in net.net.out.parameters():
        torch.nn.init.zeros_(p)
    exact = gaussian_denoiser(0.8)
    x = torch.randn(50, 2)
    for sigma in (0.01, 0.3, 4.0, 60.0):
        assert torch.allclose(net(x, sigma), exact(x, sigma), atol=1e-6)


def test_vp_preconditioning_is_the_eps_network_seen_as_a_denoiser():
    """precond='vp' wraps an eps network exactly as samplers.as_denoiser does with the schedule (lesson 3's path)."""
    torch.manual_seed(0)
    wrapped = EDMPrecond({"kind": "mlp", "dim": 2, "hidden": 16, "depth": 1}, precond="vp", schedule="cosine", T=1000)
    plain = wrapped.net
    sched = NoiseSchedule.named("cosine", 1000)
    den = as_denoiser(plain, sched)
    x = torch.randn(20, 2)
    for t in (0, 10, 500, 999):
        sigma = float(sched.sigmas[t])
        assert torch.allclose(wrapped(x, sigma), den(x, sigma), atol=1e-5, rtol=1e-5)
    c_skip, c_out, c_in, c_noise = edm.vp_preconditioning(sched.sigmas[[3, 700]], sched)
    assert torch.allclose(c_noise, torch.tensor([3.0, 700.0], dtype=c_noise.dtype), atol=1e-6)


def test_the_eps_weighting_on_the_denoiser_is_lesson_2s_eps_loss():
    """||eps_hat - n||^2 = ||D - x0||^2 / sigma^2: with the same draws, edm_loss(weighting='eps') on a 'vp' network
    equals losses.diffusion_loss on the eps network inside it (Ho et al. eq. 14)."""
    torch.manual_seed(0)
    net = EDMPrecond({"kind": "mlp", "dim": 2, "hidden": 16, "depth": 1}, precond="vp", schedule="linear", T=1000)
    sched = NoiseSchedule.named("linear", 1000)
    x0 = torch.randn(256, 2)
    with torch.no_grad():
        want = diffusion_loss(net.net, x0, sched, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.randint(sched.T, (256,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        got = edm.edm_loss(net, x0, sched.sigmas[t].float(), "eps", noise=noise)
    assert float(got) == pytest.approx(float(want), rel=1e-4)


def test_loss_weights_match_their_closed_forms_and_lesson_2s_min_snr():
    s = torch.tensor([0.01, 0.3, 1.0, 5.0], dtype=torch.float64)
    assert torch.allclose(edm.loss_weight(s, "edm", 0.5), 1 / edm.preconditioning(s, 0.5)[1] ** 2)
    assert torch.allclose(edm.loss_weight(s, "eps"), 1 / s ** 2)
    assert torch.allclose(edm.loss_weight(s, "min_snr", gamma=5.0), snr_weight(1 / s ** 2, "x0", "min_snr", 5.0))
    assert torch.equal(edm.loss_weight(s, "uniform"), torch.ones_like(s))
    with pytest.raises(ValueError, match="weighting must be one of"):
        edm.loss_weight(s, "snr")
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        edm.loss_weight(torch.tensor([0.0]))


def test_log_normal_training_noise_has_the_stated_moments():
    """ln sigma ~ N(-1.2, 1.2^2): over 200,000 draws the mean's standard error is 1.2 / sqrt(n) = 0.0027 and the
    std's 1.2 / sqrt(2n) = 0.0019; the tolerances are 5 of them."""
    ls = edm.draw_sigmas(200_000, "lognormal", torch.Generator().manual_seed(0)).log()
    assert float(ls.mean()) == pytest.approx(-1.2, abs=0.0135)
    assert float(ls.std()) == pytest.approx(1.2, abs=0.0095)
    sched = NoiseSchedule.named("cosine", 1000)
    u = edm.draw_sigmas(5000, "uniform_t", torch.Generator().manual_seed(0), schedule=sched)
    assert torch.isin(u.double(), sched.sigmas.float().double()).all()
    with pytest.raises(ValueError, match="pass schedule="):
        edm.draw_sigmas(5, "uniform_t")


def test_the_edm_family_trains_through_the_one_loop_and_samples_through_every_sampler(tmp_path):
    """1,000 steps put more than a third of Heun's samples within 3 std of a ring mode (0.57 and 0.46 on seeds 0, 1;
    an untrained network puts none there; lesson 2's family at this budget 0.08)."""
    from course_lib.data import MIXTURES
    from course_lib.metrics import hq_fraction

    tr = Trainer(TrainConfig(**{**TINY_EDM, "model": {"kind": "mlp", "hidden": 64, "depth": 2}, "batch_size": 256,
                                "steps": 1000, "warmup": 20, "lr": 3e-3})).train(progress=False)
    assert tr.model.prediction == "edm" and tr.schedule is None
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    assert hq_fraction(sample(tr.model, noise, sampler="heun", steps=18).x, MIXTURES["ring8"]()) > 0.35
    for sampler in ("euler", "heun", "dpmpp_2m", "ddim", "euler_ancestral"):
        res = sample(tr.ema, torch.randn(64, 2), sampler=sampler, steps=8, generator=torch.Generator().manual_seed(0))
        assert res.x.shape == (64, 2) and torch.isfinite(res.x).all()
    # exact resume, like every family
    cfg = TrainConfig(**TINY_EDM, learned_weight=True)
    straight = Trainer(cfg).train(progress=False)
    first = Trainer(cfg).train(steps=15, progress=False)
    first.save(tmp_path / "s.pt")
    resumed = Trainer.resume(tmp_path / "s.pt").train(progress=False)
    assert resumed.losses == straight.losses
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.state_dict().values(), straight.ema.state_dict().values()))
    assert straight.model.logvar.weight.abs().sum() > 0  # the learned weighting's u(sigma) was trained
    # an exported EDM model loads like any shipped one: no schedule, the same denoiser as the trainer's EMA
    from course_lib.checkpoints import load_pretrained

    tr.export(tmp_path / "edm.pt")
    loaded = load_pretrained(tmp_path / "edm.pt")
    assert loaded.schedule is None and loaded.config["family"] == "edm"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(noise[:8] * 3, 3.0), tr.ema(noise[:8] * 3, 3.0))
    res = sample(loaded.model, noise[:64], sampler="dpmpp_2m", steps=10)
    assert torch.isfinite(res.x).all()


def test_edm_family_options_are_checked():
    with pytest.raises(ValueError, match="noise must be one of"):
        TrainConfig(family="edm", noise="uniform")
    with pytest.raises(ValueError, match="sigma_data must be a number > 0"):
        TrainConfig(family="edm", sigma_data=0)
    with pytest.raises(ValueError, match="loss_weight must be one of"):
        TrainConfig(family="edm", loss_weight="min-snr")
    with pytest.raises(ValueError, match="net must be a denoising network"):
        build_model({"kind": "edm_precond", "net": {"kind": "vae"}})
    net = EDMPrecond({"kind": "mlp", "dim": 2, "hidden": 8, "depth": 1})
    with pytest.raises(ValueError, match="return_logvar needs"):
        net(torch.randn(3, 2), 1.0, return_logvar=True)
    assert type(build_model(net.config)) is EDMPrecond


# ---- EDM2's power EMA -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 2.5, 6.94, 16.97])
def test_sigma_rel_is_the_relative_std_of_the_power_profile(gamma):
    """Numerically: the profile p(tau) proportional to tau^gamma on [0, 1], its std by the midpoint rule."""
    tau = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    p = tau ** gamma
    p = p / p.sum()
    mean = (p * tau).sum()
    std = ((p * (tau - mean) ** 2).sum()).sqrt()
    assert posthoc_ema.sigma_rel_of_gamma(gamma) == pytest.approx(float(std), rel=1e-6)
    if gamma > 0:
        assert posthoc_ema.gamma_of_sigma_rel(posthoc_ema.sigma_rel_of_gamma(gamma)) == pytest.approx(gamma, rel=1e-9)


def test_profile_inner_products_match_numerical_integrals():
    tau = (torch.arange(400_000, dtype=torch.float64) + 0.5) / 400_000 * 5000  # [0, 5000]
    dtau = 5000 / 400_000

    def p(t, g):
        return torch.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), torch.zeros_like(tau))

    for (ta, ga), (tb, gb) in [((1000, 6.94), (3000, 16.97)), ((4000, 2.0), (4000, 2.0)), ((2500, 16.97), (900, 0.5))]:
        numeric = float((p(ta, ga) * p(tb, gb)).sum() * dtau)
        assert posthoc_ema.profile_inner(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-3)


def test_power_ema_is_the_discrete_power_weighted_average():
    """After steps 1..t the average is sum_tau w_tau theta_tau with w_tau = (1 - beta_tau) (tau / t)^(gamma + 1),
    beta_tau = (1 - 1/tau)^(gamma + 1): the telescoping product of the decays (derived by hand, computed here)."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = posthoc_ema.PowerEMA(model, gammas=(3.0,))
    thetas = torch.randn(60, dtype=torch.float64)
    for th in thetas:
        model.weight.data.fill_(float(th))
        ema.update(model)
    t, g = 60, 3.0
    w = torch.tensor([(1 - (1 - 1 / tau) ** (g + 1)) * (tau / t) ** (g + 1) for tau in range(1, t + 1)],
                     dtype=torch.float64)
    assert float(w.sum()) == pytest.approx(1.0)
    assert float(ema.averages[0].weight) == pytest.approx(float((w * thetas).sum()), rel=1e-5)


def test_posthoc_reconstruction_rebuilds_an_average_that_was_never_kept():
    """A random-walk 'training run' of 2,000 steps with two power EMAs (sigma_rel 0.05, 0.10) saved every 200 steps;
    the average of sigma_rel 0.08 rebuilt from the snapshots agrees with one tracked directly, to within 2% of the
    spread between the shortest and the longest averages (the profile fit leaves 1% of the profile's norm)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(50, 1, bias=False)
    target_gamma = posthoc_ema.gamma_of_sigma_rel(0.08)
    kept = posthoc_ema.PowerEMA(model)
    direct = posthoc_ema.PowerEMA(model, gammas=(target_gamma,))
    for step in range(1, 2001):
        model.weight.data += 0.05 * torch.randn_like(model.weight)
        kept.update(model)
        direct.update(model)
        if step % 200 == 0:
            kept.snapshot()
    rebuilt = kept.reconstruct(0.08)["weight"]
    truth = direct.averages[0].weight.detach()
    spread = (kept.averages[0].weight - model.weight).abs().mean()
    assert float((rebuilt - truth).abs().mean()) < 0.02 * float(spread) + 1e-6
    # and the check can fail: the snapshot of sigma_rel 0.05 alone is not the 0.08 average
    assert float((kept.averages[0].weight - truth).abs().mean()) > 0.05 * float(spread)
    w = posthoc_ema.posthoc_weights([s["step"] for s in kept.snapshots], [s["gamma"] for s in kept.snapshots], 2000,
                                    target_gamma)
    assert posthoc_ema.profile_error([s["step"] for s in kept.snapshots], [s["gamma"] for s in kept.snapshots], w,
                                     2000, target_gamma) < 0.02


def test_posthoc_weights_pick_a_snapshot_that_is_the_target():
    w = posthoc_ema.posthoc_weights([1000, 2000, 1000, 2000], [6.94, 6.94, 16.97, 16.97], 2000, 16.97)
    assert torch.allclose(w, torch.tensor([0, 0, 0, 1.0], dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="sigma_rel must be a number in"):
        posthoc_ema.gamma_of_sigma_rel(0.5)
    with pytest.raises(ValueError, match="one gamma per snapshot"):
        posthoc_ema.posthoc_weights([1, 2], [3.0], 2, 3.0)


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_zero_terminal_snr_rescale_is_affine_in_sqrt_alpha_bar_and_ends_in_pure_noise(name):
    """Lin et al. 2024, Algorithm 1: sqrt(alpha_bar) is shifted and scaled (an affine map of the original, checked by
    a least-squares line through all but the last step), keeps its first value, and the last step is pure noise."""
    from course_lib.schedules import make_betas, rescale_zero_terminal_snr

    before = NoiseSchedule(make_betas(name))
    after = NoiseSchedule.named(f"{name}_zero_snr")
    assert torch.allclose(after.betas, rescale_zero_terminal_snr(before.betas))
    a, b = before.alpha_bar.sqrt()[:-1], after.alpha_bar.sqrt()[:-1]
    design = torch.stack([a, torch.ones_like(a)], 1)
    fit = torch.linalg.lstsq(design, b[:, None]).solution
    assert float((design @ fit).flatten().sub(b).abs().max()) < 1e-9
    assert float(after.alpha_bar[0]) == pytest.approx(float(before.alpha_bar[0]), rel=1e-12)
    assert float(after.alpha_bar[-1]) <= 2.0 ** -24 * (1 + 1e-9) and float(before.snr[-1]) > 1e-5
    assert (after.alpha_bar.diff() < 0).all()


def test_the_lesson_11_exercise_references_agree_with_the_library():
    from course_lib.exercises import lesson11 as L

    sigma = torch.tensor([0.002, 0.3, 5.0, 80.0], dtype=torch.float64)
    assert torch.allclose(L.ref_edm_coefficients(sigma, 0.7), torch.stack(edm.preconditioning(sigma, 0.7)))
    args = (1200, posthoc_ema.gamma_of_sigma_rel(0.05), 3000, posthoc_ema.gamma_of_sigma_rel(0.15), 2500,
            posthoc_ema.gamma_of_sigma_rel(0.1))
    assert torch.allclose(L.ref_posthoc_ema_weights(*args), posthoc_ema.posthoc_weights(args[:4:2], args[1:4:2],
                                                                                       *args[4:]), rtol=1e-9)


def test_target_statistics_show_unit_variance_and_one_unpredictable_error_for_every_parameterisation():
    """On the ring with its exact denoiser: EDM's input and target have std 1 at every sigma (20,000 draws: standard
    error of a std about 0.005, tolerance 5%); the part no network can predict, carried into D by each
    parameterisation's gain, is the same for eps, x0 and F (they are one quantity, D* - x0, up to rounding)."""
    from course_lib import recipe_measures as M
    from course_lib.data import ring_of_gaussians

    ring = ring_of_gaussians()
    st = M.target_statistics(ring, [0.01, 0.5, 20.0], 0.709, n=20_000)
    assert all(abs(v - 1) < 0.05 for v in st["input_edm"] + st["target_F"])
    assert st["input_raw"][-1] > 19 and st["gain_eps"] == [0.01, 0.5, 20.0]
    for i in range(3):
        d = [st[f"unpredictable_{k}"][i] * st[f"gain_{k}"][i] for k in ("eps", "x0", "F")]
        assert max(d) - min(d) < 1e-6 * max(d) + 1e-9


def test_log_sigma_densities_integrate_to_one_and_pooling_raises_snr_by_the_pixel_ratio_for_flat_images():
    from course_lib import recipe_measures as M

    edges = torch.linspace(-12, 14, 261)
    for kind in ("lognormal", "uniform_t"):
        dens = M.log_sigma_density(kind, edges, schedule=NoiseSchedule.named("cosine"))
        assert float((dens * edges.diff()).sum()) == pytest.approx(1.0, abs=1e-6)
    flat = torch.ones(64, 1, 16, 16) * torch.linspace(-1, 1, 64)[:, None, None, None]  # constant within each image
    # pooled noise has variance sigma^2 / 4 (2x2 average of independent values), the flat signal is unchanged: the
    # SNR goes up 4x, measured on 16,384 pixels of noise (standard error of a variance ratio about 2%; tolerance 10%)
    assert M.pooled_snr(flat, 1.0, 2) / M.pooled_snr(flat, 1.0, 1) == pytest.approx(4.0, rel=0.1)
    rows = {r["schedule"]: r for r in M.terminal_snr_table()}
    assert rows["linear"]["sigma_T"] == pytest.approx(float(NoiseSchedule.named("linear").sigmas[-1]))
    assert rows["scaled_linear_zero_snr"]["snr_T"] < 1e-7 < rows["scaled_linear"]["snr_T"]
