"""What lesson 11 measures of a training recipe: the variance of a network's input and target per noise level (EDM,
Karras et al. 2022, app. B.6), the density of training noise levels, the terminal SNR of schedules (Lin et al. 2024),
the SNR of a downsampled noisy image (Hoogeboom et al. 2023, sec. 3; SD3's shift, Esser et al. 2024, sec. 5.3.2), and a
post-hoc EMA run on 2D data (EDM2, Karras et al. 2024, sec. 3)."""
from __future__ import annotations

import math

import torch

from .edm import preconditioning


@torch.no_grad()
def target_statistics(mixture, sigmas, sigma_data: float, n: int = 20_000, seed: int = 0) -> dict:
    """Per sigma, on a Gaussian mixture whose exact denoiser D* is known (analytic.mixture_denoiser):
    the std of the network's input (x raw, c_in x), the std of each parameterisation's target (eps: the noise n;
    x0: the data; F: EDM's (x0 - c_skip x) / c_out), the part of that target no network can predict (the std of the
    target minus its best prediction from x), and how much a network's error is magnified in D (eps: sigma; x0: 1;
    F: c_out). Each std is per coordinate; one list entry per sigma."""
    from .analytic import mixture_denoiser

    exact = mixture_denoiser(mixture)
    g = torch.Generator().manual_seed(seed)
    out = {k: [] for k in ("sigma", "input_raw", "input_edm", "target_eps", "target_x0", "target_F",
                           "unpredictable_eps", "unpredictable_x0", "unpredictable_F", "gain_eps", "gain_x0", "gain_F")}
    for sigma in [float(s) for s in sigmas]:
        x0 = mixture.sample(n, g).double()
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x = x0 + sigma * noise
        best = exact(x, sigma)
        c_skip, c_out, c_in, _ = (float(v) for v in preconditioning(torch.tensor(sigma, dtype=torch.float64), sigma_data))
        f_target, f_best = (x0 - c_skip * x) / c_out, (best - c_skip * x) / c_out
        eps_best = (x - best) / sigma
        rows = {"sigma": sigma, "input_raw": x.std(), "input_edm": (c_in * x).std(), "target_eps": noise.std(),
                "target_x0": x0.std(), "target_F": f_target.std(), "unpredictable_eps": (noise - eps_best).std(),
                "unpredictable_x0": (x0 - best).std(), "unpredictable_F": (f_target - f_best).std(),
                "gain_eps": sigma, "gain_x0": 1.0, "gain_F": c_out}
        for k, v in rows.items():
            out[k].append(float(v))
    return out


def log_sigma_density(kind: str, edges: torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2, schedule=None):
    """The density of ln sigma over the bins `edges` for 'lognormal' (exact: normal CDF differences) or 'uniform_t'
    (each of the schedule's T levels with mass 1/T), divided by the bin widths."""
    edges = torch.as_tensor(edges, dtype=torch.float64)
    widths = edges.diff()
    if kind == "lognormal":
        cdf = 0.5 * (1 + torch.erf((edges - p_mean) / (p_std * math.sqrt(2))))
        return cdf.diff() / widths
    if kind == "uniform_t":
        if schedule is None:
            raise ValueError("kind='uniform_t' needs the schedule")
        counts = torch.histogram(schedule.sigmas.log(), bins=edges).hist
        return counts / schedule.T / widths
    raise ValueError(f"kind must be 'lognormal' or 'uniform_t', got {kind!r}")


def terminal_snr_table(names=("linear", "scaled_linear", "cosine", "linear_zero_snr", "scaled_linear_zero_snr"),
                       T: int = 1000) -> list[dict]:
    """Each schedule's last step: alpha_bar, SNR, sigma, and the share sqrt(alpha_bar) of the data left in x_T."""
    from .schedules import NoiseSchedule

    rows = []
    for name in names:
        s = NoiseSchedule.named(name, T)
        ab = float(s.alpha_bar[-1])
        rows.append({"schedule": name, "alpha_bar_T": ab, "snr_T": ab / (1 - ab), "sigma_T": float(s.sigmas[-1]),
                     "signal_left": math.sqrt(ab)})
    return rows


@torch.no_grad()
def pooled_snr(images: torch.Tensor, sigma: float, factor: int, seed: int = 0) -> float:
    """The signal-to-noise ratio of images + sigma noise after average pooling by `factor` (what a lower-resolution
    view of the image sees): variance of the pooled clean images over the variance of the pooled noise, measured."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    g = torch.Generator().manual_seed(seed)
    noise = sigma * torch.randn(images.shape, generator=g)
    pool = torch.nn.functional.avg_pool2d
    signal = pool(images, factor) if factor > 1 else images
    pooled_noise = pool(noise, factor) if factor > 1 else noise
    return float(signal.var() / pooled_noise.var())


def posthoc_run(steps: int = 3000, snapshot_every: int = 300, sigma_rels=(0.03, 0.05, 0.08, 0.12, 0.2),
                seed: int = 0, samples: int = 4000, progress: bool = True) -> dict:
    """Train lesson 11's ring8 EDM model while keeping EDM2's two power EMAs (sigma_rel 0.05, 0.10, saved every
    `snapshot_every` steps) and, for comparison, a power EMA of every width in sigma_rels tracked directly. For each
    width: the high-quality share of Heun samples from the rebuilt average and from the tracked one, and the
    relative distance between their weights."""
    from .data import MIXTURES
    from .metrics import hq_fraction
    from .posthoc_ema import PowerEMA, gamma_of_sigma_rel
    from .samplers import sample
    from .train import Trainer, preset

    trainer = Trainer(preset("ring8_edm", steps=steps, seed=seed))
    kept = PowerEMA(trainer.model)
    direct = PowerEMA(trainer.model, gammas=[gamma_of_sigma_rel(s) for s in sigma_rels])

    def callback(t):
        kept(t)
        direct(t)
        if t.step % snapshot_every == 0 or t.step == t.config.steps:
            kept.snapshot()

    trainer.train(callback=callback, every=1, progress=progress)
    mix, net = MIXTURES["ring8"](), trainer.ema
    noise = torch.randn(samples, 2, generator=torch.Generator().manual_seed(seed + 1))

    def hq(state):
        net.load_state_dict(state)
        with torch.no_grad():
            return hq_fraction(sample(net, noise, sampler="heun", steps=18).x, mix)

    out = {"sigma_rel": list(sigma_rels), "rebuilt_hq": [], "tracked_hq": [], "weight_distance": [],
           "snapshots": len(kept.snapshots), "steps": steps}
    for sr, avg in zip(sigma_rels, direct.averages):
        rebuilt, tracked = kept.reconstruct(sr), avg.state_dict()
        num = sum(float((rebuilt[k] - tracked[k]).pow(2).sum()) for k in tracked)
        den = sum(float(tracked[k].pow(2).sum()) for k in tracked)
        out["weight_distance"].append(math.sqrt(num / den))
        out["rebuilt_hq"].append(hq(rebuilt))
        out["tracked_hq"].append(hq(tracked))
    return out
