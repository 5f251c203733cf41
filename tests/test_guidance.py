"""Guided denoisers (course_lib.guidance) against exact answers on Gaussian mixtures, where Bayes' rule is explicit."""
import math

import pytest
import torch

from course_lib.analytic import mixture_class_logits, mixture_conditional_denoiser, mixture_denoiser
from course_lib.data import ring_of_gaussians
from course_lib.guidance import classifier_free, classifier_guidance, classifier_log_prob, null_label_of
from course_lib.nets import TimeMLP
from course_lib.samplers import as_denoiser, karras_sigmas, sample
from course_lib.schedules import NoiseSchedule

RING = ring_of_gaussians()
K = len(RING.modes)


def _points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64) * 1.5, torch.randint(0, K, (n,), generator=g)


def _by_hand(x, sigma, y):
    """Mode y's Gaussian denoiser and the mixture's, written out with numpy-style arithmetic (independent of analytic)."""
    mu, s2 = RING.modes.double(), float(RING.std) ** 2
    shrink = s2 / (s2 + sigma**2)
    cond = mu[y] + shrink * (x - mu[y])
    d2 = ((x[:, None, :] - mu[None]) ** 2).sum(-1)
    r = torch.exp(-(d2 - d2.min(1, keepdim=True).values) / (2 * (s2 + sigma**2)))
    r = r / r.sum(1, keepdim=True)
    uncond = (r[..., None] * (mu[None] + shrink * (x[:, None, :] - mu[None]))).sum(1)
    return cond, uncond


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 5.0])
def test_cfg_is_unconditional_at_0_conditional_at_1_and_extrapolates_beyond(sigma):
    den = mixture_conditional_denoiser(RING)
    x, y = _points()
    cond, uncond = _by_hand(x, sigma, y)
    assert torch.allclose(classifier_free(den, 0.0)(x, sigma, y=y), uncond, atol=1e-12)
    assert torch.allclose(classifier_free(den, 1.0)(x, sigma, y=y), cond, atol=1e-12)
    assert torch.allclose(classifier_free(den, 3.5)(x, sigma, y=y), uncond + 3.5 * (cond - uncond), atol=1e-12)
    # the same with the unconditional model given separately instead of through the 'no label' index
    sep = classifier_free(den, 3.5, uncond=mixture_denoiser(RING))
    assert torch.allclose(sep(x, sigma, y=y), uncond + 3.5 * (cond - uncond), atol=1e-12)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 5.0])
def test_classifier_guidance_at_scale_1_turns_the_unconditional_denoiser_into_the_conditional_one(sigma):
    # Bayes: grad log p(x | y) = grad log p(x) + grad log p(y | x), and D = x + sigma^2 grad log p (Tweedie)
    x, y = _points(seed=1)
    guided = classifier_guidance(mixture_denoiser(RING), classifier_log_prob(mixture_class_logits(RING)), 1.0)
    cond, uncond = _by_hand(x, sigma, y)
    assert torch.allclose(guided(x, sigma, y=y), cond, atol=1e-9)
    zero = classifier_guidance(mixture_denoiser(RING), classifier_log_prob(mixture_class_logits(RING)), 0.0)
    assert torch.allclose(zero(x, sigma, y=y), uncond, atol=1e-12)


def test_the_classifier_gradient_matches_finite_differences_for_a_network_in_the_alpha_bar_view():
    torch.manual_seed(0)
    schedule = NoiseSchedule.named("cosine", 1000)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5)).double()
    clf = lambda x_t, t: net(torch.cat([x_t, t.double()[:, None] / 1000], 1))  # noqa: E731  (a noise-aware classifier)
    log_prob = classifier_log_prob(clf, schedule)
    base = lambda x, sigma: torch.zeros_like(x)  # noqa: E731  (a denoiser that returns 0: D_s is the guidance term)
    from course_lib.samplers import Denoiser

    sigma, s = float(schedule.sigmas[400]), 2.0
    guided = classifier_guidance(Denoiser(base), log_prob, s, num_classes=5)
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():  # as inside a sampler
        term = guided(x, sigma, y=y) / (s * sigma**2)
    h, fd = 1e-6, torch.zeros_like(x)
    for j in range(2):
        e = torch.zeros_like(x)
        e[:, j] = h
        lp = lambda z: log_prob(z, sigma).gather(1, y[:, None]).squeeze(1)  # noqa: E731
        fd[:, j] = (lp(x + e) - lp(x - e)) / (2 * h)
    assert torch.allclose(term, fd, rtol=1e-6, atol=1e-8)


def test_guidance_interval_and_rescale():
    den = mixture_conditional_denoiser(RING)
    x, y = _points(seed=2)
    calls = []
    counting = mixture_conditional_denoiser(RING)
    inner_fn = counting.fn
    counting.fn = lambda x, sigma, y=None: calls.append(len(x)) or inner_fn(x, sigma, y=y)
    g = classifier_free(counting, 4.0, interval=(0.2, 2.0))
    cond_lo, unc_lo = _by_hand(x, 0.1, y)
    cond_in, unc_in = _by_hand(x, 1.0, y)
    assert torch.allclose(g(x, 0.1, y=y), cond_lo, atol=1e-12) and calls == [len(x)]  # outside: conditional, one call
    assert torch.allclose(g(x, 1.0, y=y), unc_in + 4 * (cond_in - unc_in), atol=1e-12) and calls[-1] == 2 * len(x)
    plain, full = classifier_free(den, 4.0), classifier_free(den, 4.0, rescale=1.0)
    assert torch.allclose(classifier_free(den, 4.0, rescale=0.0)(x, 1.0, y=y), plain(x, 1.0, y=y))
    eps = lambda d: (x - d) / 1.0  # noqa: E731
    got, want = eps(full(x, 1.0, y=y)).std(dim=1), eps(den(x, 1.0, y=y)).std(dim=1)
    assert torch.allclose(got, want, rtol=1e-9)  # rescaled to the conditional prediction's spread, sample by sample


def test_guided_samples_land_on_the_requested_mode_through_any_sampler():
    # w = 1 samples p(x | y) exactly (up to discretisation): n = 400 per sampler, every sample within 4 std of mode y
    # (the chance a true sample lies beyond 4 std in 2D is exp(-8) = 3e-4, so 400 samples miss it with prob. 0.87+)
    n, g = 400, torch.Generator().manual_seed(0)
    y = torch.arange(n) % K
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    sig = karras_sigmas(40, 0.002, 20.0)
    guided = classifier_free(mixture_conditional_denoiser(RING), 1.0)
    for sampler in ("euler", "heun", "dpmpp_2m"):
        x = sample(guided, noise, sigmas=sig, sampler=sampler, model_kwargs={"y": y}).x
        d = (x - RING.modes.double()[y]).norm(dim=1) / float(RING.std)
        assert (d < 4).float().mean() >= 0.99, (sampler, d.max())
    cg = classifier_guidance(mixture_denoiser(RING), classifier_log_prob(mixture_class_logits(RING)), 1.0)
    x = sample(cg, noise, sigmas=sig, sampler="dpmpp_2m", model_kwargs={"y": y}).x  # under torch.no_grad
    assert ((x - RING.modes.double()[y]).norm(dim=1) / float(RING.std) < 4).float().mean() >= 0.99


def test_a_trained_style_network_is_guided_in_one_batch_and_bad_inputs_are_refused():
    schedule = NoiseSchedule.named("linear", 1000)
    net = TimeMLP(dim=2, hidden=16, depth=1, num_classes=K).double()
    x, y = _points(seed=3)
    den = as_denoiser(net, schedule)
    g0, g1 = classifier_free(net, 0.0, schedule=schedule), classifier_free(net, 1.0, schedule=schedule)
    with torch.no_grad():
        assert torch.allclose(g0(x, 0.7, y=y), den(x, 0.7, y=torch.full_like(y, K)), atol=1e-12)
        assert torch.allclose(g1(x, 0.7, y=y), den(x, 0.7, y=y), atol=1e-12)
    assert null_label_of(net) == K
    with pytest.raises(ValueError, match="no 'no label' index"):
        classifier_free(TimeMLP(dim=2, hidden=8, depth=1), 2.0, schedule=schedule)
    with pytest.raises(ValueError, match=r"classes 0..7 \(8 is the 'no label' index\)"):
        g1(x, 0.7, y=torch.full_like(y, K))
    with pytest.raises(ValueError, match="pass y="):
        g1(x, 0.7)
    for bad in (-1.0, float("nan"), "3"):
        with pytest.raises(ValueError, match="guidance scale"):
            classifier_free(net, bad, schedule=schedule)
    with pytest.raises(ValueError, match="interval"):
        classifier_free(net, 2.0, schedule=schedule, interval=(1.0, 0.5))
    with pytest.raises(ValueError, match="rescale"):
        classifier_free(net, 2.0, schedule=schedule, rescale=1.5)
    with torch.no_grad():
        assert math.isfinite(float(classifier_free(net.float(), 3.0, schedule=schedule)(x.float(), 0.7, y=y).sum()))


def test_the_noise_aware_classifier_family_learns_digits_and_is_at_chance_on_pure_noise():
    from course_lib.evaluate import noisy_accuracy
    from course_lib.train import TrainConfig, Trainer

    tr = Trainer(TrainConfig(data="digits", family="classifier", batch_size=64, steps=300, warmup=20, lr=2e-3,
                             model={"kind": "noisy_classifier", "base": 8})).train(progress=False)
    acc = noisy_accuracy(tr.ema, tr.schedule, steps=(0, 999))["accuracy_by_step"]
    # 297 held-out digits: chance is 0.1 with a standard error of 0.017, so 0.4 is 17 standard errors above it;
    # at t = 999 (cosine: alpha_bar 2e-9) the image is gone, and no classifier can beat the largest class share (0.11)
    assert acc["0"] > 0.4 and acc["999"] < 0.2, acc
    assert set(tr.history) == {"loss", "accuracy"} and tr.history["loss"][-1] < tr.history["loss"][0]
    with pytest.raises(ValueError, match="labelled data"):
        TrainConfig(data="ring8", family="classifier")
    with pytest.raises(ValueError, match="noisy_classifier"):
        TrainConfig(data="digits", family="classifier")  # the loop's default model is a 2D MLP


def test_the_guidance_benchmark_records_every_configuration_and_guidance_raises_label_accuracy(monkeypatch, tmp_path):
    import json

    from course_lib.bench import guidance as G
    from course_lib.cli import main

    monkeypatch.setattr(G, "QUICK_SCALES", {"cfg": (0.0, 3.0), "classifier": (4.0,)})
    records = G.bench_guidance(quick=True, samples=40, progress=lambda s: None)
    assert [(r["method"], r["scale"]) for r in records] == [("cfg", 0.0), ("cfg", 3.0), ("classifier", 4.0)]
    assert all(set(r) == set(G.RECORD_KEYS) and r["nfe"] == 10 and r["samples"] == 40 for r in records)
    acc = {(r["method"], r["scale"]): r["label_accuracy"] for r in records}
    # 40 samples: unguided (w = 0) labels match by chance (0.1, standard error 0.05); guided ones nearly always
    assert acc[("cfg", 0.0)] < 0.35 and acc[("cfg", 3.0)] > 0.85 and acc[("classifier", 4.0)] > 0.85
    out = tmp_path / "g.json"
    assert main(["bench", "guidance", "--quick", "--samples", "20", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 3
    assert main(["bench", "guidance", "--quick", "--json", str(out)]) == 2  # never overwrites without --force
    assert main(["bench", "guidance", "--quick", "--seeds", "1", "1"]) == 2
    assert main(["bench", "guidance", "--quick", "--samples", "19"]) == 2
    with pytest.raises(ValueError, match="method must be one of"):
        G.guided("sag", 1.0, {"digits_cond": None})
    with pytest.raises(ValueError, match="unknown method"):
        G.bench_guidance(samples=20, scales={"sag": (1.0,)})
    # the interval is honoured: guidance on noise levels the sampler never visits is the conditional model (w = 1)
    never = G.bench_guidance(samples=40, seeds=(0,), nfe=10, scales={"cfg_interval": (3.0,), "cfg": (1.0,)},
                             interval=(1e4, 2e4), progress=lambda s: None)
    assert never[0]["interval"] == [1e4, 2e4] and never[1]["interval"] is None
    assert never[0]["label_accuracy"] == never[1]["label_accuracy"]
    assert never[0]["fd"] == pytest.approx(never[1]["fd"], rel=1e-3)
    # the per-class FD is the mean of the per-class FDs (checked against metrics directly on two classes)
    from course_lib.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    feats, real = torch.randn(40, 3, generator=g), torch.randn(60, 3, generator=g) + 1
    labels, real_labels = torch.arange(40) % 2, torch.arange(60) % 2
    want = sum(frechet_distance(feats[labels == c], real[real_labels == c]) for c in (0, 1)) / 2
    assert G.fd_per_class(feats, labels, real, real_labels) == pytest.approx(want)


def test_a_mixture_source_labels_each_point_with_its_mode_and_draws_the_same_points_as_before():
    from course_lib.data import DataSource
    from course_lib.train import TrainConfig

    src = DataSource("ring8")
    x, y = src.sample(500, torch.Generator().manual_seed(0))
    assert src.num_classes == 8 and y.shape == (500,) and y.dtype == torch.long
    assert torch.equal(x, ring_of_gaussians().sample(500, torch.Generator().manual_seed(0)))  # unconditional runs unchanged
    # std 0.05 against modes 0.77 apart: a point is nearest its own mode unless 7.6 std out (never, at n = 500)
    assert torch.equal(torch.cdist(x, ring_of_gaussians().modes).argmin(1), y)
    with pytest.raises(ValueError, match="labelled data"):
        TrainConfig(data="two_moons", conditional=True)


def test_tilted_mixture_samples_have_the_moments_of_the_tilted_density_by_quadrature():
    """Sampled (multinomial on a grid) vs integrated (trapezoid on an independent, finer grid): the mean offset and
    spread of p(x|y)^w p(x)^(1-w) around its mode, on six overlapping modes where the tilt matters."""
    from course_lib.analytic import tilted_mixture_samples
    from course_lib.data import ring_of_gaussians

    mix = ring_of_gaussians(6, 1.0, 0.4)
    n = 20_000
    for w in (1.0, 3.0):
        x = tilted_mixture_samples(mix, w, torch.zeros(n, dtype=torch.long), torch.Generator().manual_seed(0))
        g = torch.linspace(-3.0, 3.0, 601, dtype=torch.float64)
        pts = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2) + mix.modes[0].double()
        log_all = -((pts[:, None] - mix.modes[None].double()) ** 2).sum(-1) / (2 * 0.16)
        dens = torch.softmax(w * log_all[:, 0] + (1 - w) * torch.logsumexp(log_all, 1), 0)
        mean = (dens[:, None] * pts).sum(0)
        var = (dens[:, None] * (pts - mean) ** 2).sum(0)
        se = (var / n).sqrt()
        assert ((x.double().mean(0) - mean).abs() < 4 * se + 1e-3).all(), (w, x.mean(0), mean)
        assert ((x.double().var(0) - var).abs() < 0.05 * var).all(), (w, x.var(0), var)  # SE of a variance ~1%
        if w == 3.0:  # guidance's target leans away from the neighbouring modes: further out than mode 0's centre
            assert mean.norm() > mix.modes[0].norm() + 0.05
    with pytest.raises(ValueError, match="labels"):
        tilted_mixture_samples(mix, 2.0, torch.tensor([6]))
