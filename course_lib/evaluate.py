"""Measuring a trained model, for its checkpoint card and the tests: a diffusion model's sample quality and likelihood
bound, a noise-aware classifier's accuracy per noise level."""
from __future__ import annotations

import math
import time

import torch

from .data import MIXTURES, DataSource, digits_split
from .schedules import NoiseSchedule


def _device_of(model) -> torch.device:
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def sample_quality(model, schedule: NoiseSchedule, config: dict, n: int = 2000, steps: int | None = None,
                   seed: int = 0, classifier=None, progress: bool = False, return_samples: bool = False) -> dict:
    """DDPM-sample n points/images with `steps` respaced steps (all T by default) and score them.

    2D mixtures: high-quality fraction and modes covered. Digits: the shipped classifier's mean confidence and
    its class histogram's largest gap to uniform (for a class-conditional model, labels cycle 0..9 and the
    share classified as the requested label is reported too). With return_samples, out["samples"] holds them.
    """
    from .metrics import hq_fraction, modes_covered
    from .samplers import sample_ddpm, uniform_timesteps

    g = torch.Generator().manual_seed(seed)
    device = _device_of(model)
    data = config["data"]
    start = time.perf_counter()
    if getattr(model, "prediction", None) == "flow":  # a flow model has no DDPM: its ODE by Euler, uniform in t
        return _flow_sample_quality(model, data, n, steps or 1000, g, start, progress, return_samples, classifier)
    if config.get("family") in FEW_STEP_SAMPLING:  # no schedule either: lesson 11's EDM models, lesson 12's students
        return _denoiser_sample_quality(model, config, n, g, start, return_samples)
    ts = uniform_timesteps(schedule, steps) if steps else None
    if data == "digits":
        kwargs = {"y": (torch.arange(n) % 10).to(device)} if config.get("conditional") else {}
        x = torch.randn(n, 1, 8, 8, generator=g).to(device)
        x = sample_ddpm(model, x, schedule, ts, clip=1.0, generator=g, progress=progress, **kwargs).cpu()
        from .classifier import judge, load_classifier

        clf = classifier or load_classifier()
        out = judge(clf, x)
        if kwargs:
            out["label_accuracy"] = (clf(x).argmax(1) == kwargs["y"].cpu()).float().mean().item()
    else:
        mixture = MIXTURES[data]() if data in MIXTURES else None
        conditional = bool(config.get("conditional")) and mixture is not None
        kwargs = {"y": (torch.arange(n) % len(mixture.modes)).to(device)} if conditional else {}
        x = sample_ddpm(model, torch.randn(n, 2, generator=g).to(device), schedule, ts, generator=g,
                        progress=progress, **kwargs).cpu()
        out = {}
        if mixture is not None:
            out = {"hq_fraction": hq_fraction(x, mixture), "modes_covered": modes_covered(x, mixture),
                   "modes": len(mixture.modes)}
        if conditional:  # the label is the mode: how often the nearest mode is the one asked for; and the same
            # network without labels (its 'no label' index), the unconditional model that guidance needs
            from .metrics import nearest_mode

            out["label_accuracy"] = (nearest_mode(x, mixture)[0] == kwargs["y"].cpu()).float().mean().item()
            x_unc = sample_ddpm(model, torch.randn(n, 2, generator=g).to(device), schedule, ts, generator=g).cpu()
            out["no_label"] = {"hq_fraction": hq_fraction(x_unc, mixture),
                               "modes_covered": modes_covered(x_unc, mixture)}
    out.update(samples=n, sampler=f"DDPM ancestral, {len(ts) if ts else schedule.T} steps",
               sample_seconds=round(time.perf_counter() - start, 2))
    if return_samples:
        out["samples"] = x
    return out


# how the card measures a model with no discrete schedule: (sampler, NFE) or, for a progressive student, the
# halving grid of its final round (the levels it was trained on)
FEW_STEP_SAMPLING = {"edm": ("dpmpp_2m", 20), "consistency": ("consistency", 1), "adversarial": ("consistency", 1),
                     "progressive": ("euler", None)}


def _denoiser_sample_quality(model, config, n, g, start, return_samples) -> dict:
    """Digits from an EDM model or a few-step student with the course's sampler: the classifier's confidence and class
    gap, and FD / precision / recall on its features against the training digits (what the benchmarks' judge reads)."""
    from .families.fewstep import halving_grid
    from .metrics import frechet_distance, precision_recall
    from .samplers import sample

    if config["data"] != "digits":
        raise ValueError(f"the card's sample quality of a {config['family']} model is measured on digits, not "
                         f"{config['data']!r}")
    sampler, nfe = FEW_STEP_SAMPLING[config["family"]]
    levels = dict(steps=nfe) if nfe else dict(sigmas=halving_grid(config["final_steps"], config["sigma_max"]))
    x = sample(model, torch.randn(n, 1, 8, 8, generator=g).to(_device_of(model)), sampler=sampler, clip=1.0,
               generator=g, **levels).x.cpu().clamp(-1, 1)
    from .classifier import judge, load_classifier

    clf = load_classifier()
    with torch.no_grad():
        feats, ref = clf.features(x), clf.features(digits_split("train")[0])
    out = {**judge(clf, x), "fd": frechet_distance(feats, ref), **precision_recall(ref, feats)}
    out.update(samples=n, sampler=f"{sampler}, {nfe or config['final_steps']} NFE", nfe=nfe or config["final_steps"],
               sample_seconds=round(time.perf_counter() - start, 2))
    if return_samples:
        out["samples"] = x
    return out


def _flow_sample_quality(model, data, n, steps, g, start, progress, return_samples, classifier) -> dict:
    from .metrics import hq_fraction, modes_covered
    from .samplers import sample

    shape = (n, 1, 8, 8) if data == "digits" else (n, 2)
    noise = torch.randn(shape, generator=g).to(_device_of(model))
    x = sample(model, noise, sampler="euler", steps=steps, spacing="uniform", clip=1.0 if data == "digits" else None,
               progress=progress).x.cpu()
    if data == "digits":
        from .classifier import judge, load_classifier
        out = judge(classifier or load_classifier(), x)
    else:
        mixture = MIXTURES[data]() if data in MIXTURES else None
        out = {"hq_fraction": hq_fraction(x, mixture), "modes_covered": modes_covered(x, mixture),
               "modes": len(mixture.modes)} if mixture is not None else {}
    out.update(samples=n, sampler=f"Euler on the flow ODE, {steps} steps uniform in t",
               sample_seconds=round(time.perf_counter() - start, 2))
    if return_samples:
        out["samples"] = x
    return out


@torch.no_grad()
def held_out_likelihood(model, schedule: NoiseSchedule, config: dict, n: int = 2000, n_t: int | None = None,
                        seed: int = 1) -> dict:
    """The variational bound on held-out data: nats per point for 2D, bits per dimension for digits."""
    from .data import DIGITS_LEVELS
    from .losses import variational_bound

    g = torch.Generator().manual_seed(seed)
    device = _device_of(model)
    kwargs = {}
    if config["data"] == "digits":
        x = digits_split("test")[0].to(device)
        levels, key, unit = DIGITS_LEVELS, "bits_per_dim", "bits/dim"
    else:
        x, y = DataSource(config["data"]).sample(n, g)
        x, levels, key, unit = x.to(device), None, "total", "nats per point"
        if config.get("conditional") and y is not None:  # the bound of p(x | y), at the points' own labels
            kwargs = {"y": y.to(device)}
    out = {"unit": unit, "data": f"{len(x)} held-out {'test images' if levels else 'fresh points'}"
                                 + (", each given its mode as the label" if kwargs else ""),
           "timesteps": "all" if n_t is None else f"{n_t} random per sample"}
    for variance in ("beta", "posterior"):
        vals = variational_bound(model, x, schedule, variance=variance, levels=levels, n_t=n_t, generator=g,
                                 **kwargs)[key]
        out[f"nll_bound_{variance}"] = round(vals.mean().item(), 4)
        out[f"nll_bound_{variance}_stderr"] = round(vals.std().item() / math.sqrt(len(vals)), 4)
    return out


@torch.no_grad()
def noisy_accuracy(classifier, schedule: NoiseSchedule, steps=(0, 100, 250, 400, 550, 700, 850, 999),
                   seed: int = 0) -> dict:
    """A noise-aware classifier's accuracy on the held-out digits noised to each step t (one noise draw per image)."""
    from .forward import q_sample

    g = torch.Generator().manual_seed(seed)
    device = _device_of(classifier)
    x, y = digits_split("test")
    out = {}
    for t in steps:
        xt = q_sample(x, int(t), schedule, generator=g).to(device)
        logits = classifier(xt, torch.full((len(x),), int(t), device=device))
        out[str(int(t))] = round((logits.argmax(1).cpu() == y).float().mean().item(), 4)
    return {"accuracy_by_step": out, "data": f"{len(x)} held-out test images", "chance": 0.1}
