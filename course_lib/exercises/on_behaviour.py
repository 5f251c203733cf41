"""Exercises graded on behaviour (lessons 2, 3, 4): a training step, a sampling loop, a VAE step.

The learner's function runs on a task drawn fresh from a secret seed (course_lib.grading.tasks): a Gaussian mixture
with modes at random places, which the learner's code never sees directly. A training step is run by a fixed
procedure (course_lib.grading.harnesses) on the task's points, and the weights it returns are loaded into a fresh
network here and sampled or scored with the library's own code; a sampling loop calls an exact denoiser that the
judge serves and counts. Thresholds were calibrated on the reference solution, the usual mistakes and the shortcuts
(tests/test_exercises.py runs all three; the numbers are in the comments).
"""
from __future__ import annotations

import math

import torch

from ..grading import harnesses as _H
from ..grading import tasks as _T
from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register
from .common import SAMPLER_LIBRARIES, SAMPLER_RULE, _per_sample

# Calibrated on random tasks (python -m course_lib bench exercises): the reference, the usual mistakes and the shortcuts.
TRAIN_HQ_FLOOR = 0.6  # the reference step reaches 0.77-0.95 over 40 tasks; the usual mistakes and training on the
# course's own ring instead of the given batches stay below 0.2
MODE_SHARE = 0.25  # every mode must hold at least this share of its fair n / k samples: the reference step's emptiest
# mode holds 0.49 of it at worst over 40 tasks, a plain Euler loop's 0.45 over 400
SAMPLE_HQ_FLOOR = 0.7  # sampling: a plain Euler loop reaches 0.82 at worst over 400 tasks, DPM-Solver++(2M) 0.92;
# one call, no call or the course's own data: 0.24 on average
SPREAD_FLOOR = 0.9  # sampling: RMS distance of near-mode samples to their mode, in std: exact samples 1.38, Euler
# 1.35-1.61 and DPM-Solver++(2M) 1.08-1.82 over 100 tasks; points moved to their cluster's centre 0.31-0.68
ELBO_GAP = 2.0  # nats below the data's exact mean log-likelihood: the reference step is 0.65-0.98 below over 12 tasks;
# the mistakes 7.6 or more, training on the course's own ring 2.7 or more

def _losses_verdict(name: str, losses: torch.Tensor, changed: bool) -> CheckResult | None:
    """What went wrong with a training run, from its loss curve and whether the weights moved (None: nothing)."""
    if not torch.isfinite(losses).all():
        step = int((~torch.isfinite(losses)).nonzero()[0])
        return CheckResult(name, FAILED, f"the loss your step returned became {float(losses[step])} at step {step}.",
                           "Look for a division by a value that can be 0, or a log/sqrt of a negative number.")
    if not changed:
        return CheckResult(name, FAILED, "the network's weights never changed during training.",
                           "Each step: optimizer.zero_grad(), compute the loss, loss.backward(), optimizer.step().")
    first, last = float(losses[:50].mean()), float(losses[-200:].mean())
    if not last < 0.95 * first:
        return CheckResult(name, FAILED, f"the loss did not go down (mean {first:.3g} over the first 50 steps, "
                           f"{last:.3g} over the last 200).",
                           "Zero the gradients every step (optimizer.zero_grad()) before loss.backward(), then "
                           "optimizer.step(); and return the loss you minimised.")
    return None


def _trained_or_verdict(name: str, outputs: list, net):
    """(the trained network, None), or (None, the verdict on what went wrong with the training run)."""
    got = outputs[0] if outputs else None
    if not isinstance(got, dict) or not isinstance(got.get("losses"), torch.Tensor):
        return None, CheckResult(name, FAILED, "the training run returned no result.", "This is a bug in the course.")
    params = {k[len("param."):]: v for k, v in got.items() if k.startswith("param.")}
    init = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        net.load_state_dict(params, strict=True)
    except (RuntimeError, KeyError, TypeError) as e:
        return None, CheckResult(name, FAILED, f"the trained network came back with different weights or shapes "
                                 f"({str(e)[:120]}).", "Train the network you are given in place; do not replace it.")
    if not all(torch.isfinite(v).all() for v in params.values()):
        return None, CheckResult(name, FAILED, "the trained network's weights contain NaN or infinity.",
                                 "Look for a division by a value that can be 0, or a log/sqrt of a negative number.")
    changed = any(not torch.equal(init[k], params[k]) for k in init)
    return net.eval(), _losses_verdict(name, got["losses"].double(), changed)


def _quality(x, mix) -> tuple[float, torch.Tensor, float]:
    """(share of samples within 3 std of a mode, samples per mode, RMS distance in std of those to their mode)."""
    from ..metrics import nearest_mode

    idx, dist = nearest_mode(x, mix)
    near = dist <= 3.0
    counts = torch.bincount(idx[near], minlength=len(mix.modes))
    spread = float(dist[near].pow(2).mean().sqrt()) if near.any() else 0.0
    return float(near.float().mean()), counts, spread


def _points_or_verdict(name: str, x) -> CheckResult | None:
    want = (_T.SAMPLE_POINTS, 2)
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
        return CheckResult(name, FAILED, f"expected the final points, shape {want}, got "
                           f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.",
                           "Return x after the last step.")
    if not torch.isfinite(x).all():
        return CheckResult(name, FAILED, "the samples contain NaN or infinity.",
                           "Divide by sigma only while sigma > 0: the last step goes to sigma = 0.")
    return None


# ---- lesson 2: the training step ----------------------------------------------------------------------------------

def ref_train_step(model, optimizer, x0, alpha_bar):
    """One step of DDPM training (Ho et al. 2020, Algorithm 1): uniform t, eps-prediction MSE, one optimizer step."""
    t = torch.randint(0, len(alpha_bar), (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    ab = _per_sample(alpha_bar[t], x0).to(x0.dtype)
    loss = ((noise - model(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t)) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def assess_train_step(task, outputs: list) -> CheckResult | None:
    """Lesson 2: the loss went down, and samples of the trained network (DDPM, every step) reach the quality floor on
    the task's mixture, every mode filled."""
    from ..samplers import sample
    from ..schedules import NoiseSchedule

    name, seed, mix = "train_step", task.private["seed"], task.private["mixture"]
    net, verdict = _trained_or_verdict(name, outputs, _H.denoiser_net(seed))
    if verdict:
        return verdict
    noise = torch.randn(_T.SAMPLE_POINTS, 2, generator=torch.Generator().manual_seed(seed + 3))
    try:
        with torch.no_grad():
            x = sample(net, noise, NoiseSchedule.named("cosine", _T.T_TRAIN), "ddpm",
                       timesteps=list(range(_T.T_TRAIN - 1, -1, -1)), clip=1.5,
                       generator=torch.Generator().manual_seed(seed + 4)).x
        hq, counts, _ = _quality(x, mix)
    except (FloatingPointError, ValueError):
        hq, counts = 0.0, torch.zeros(len(mix.modes))
    fair = MODE_SHARE * _T.SAMPLE_POINTS / len(mix.modes)
    if hq >= TRAIN_HQ_FLOOR and bool((counts >= fair).all()):
        return None
    return CheckResult(name, FAILED, f"the loss went down, but samples from the trained network are poor: {hq:.0%} "
                       f"land near one of the {len(mix.modes)} modes of the data (need {TRAIN_HQ_FLOOR:.0%}), and the "
                       f"emptiest mode holds {int(counts.min())} of {_T.SAMPLE_POINTS} (need {fair:.0f}).",
                       "The network must learn to predict the noise added to the batch you are given: draw t "
                       "uniformly from 0 .. T-1 (one per sample), x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, and "
                       "minimise the mean squared error between model(x_t, t) and that noise.")


def _step_forgetting(forget: str):
    """The reference training step with one usual mistake (for the tests and the hints)."""
    def step(model, optimizer, x0, alpha_bar):
        t = torch.randint(0, len(alpha_bar), (x0.shape[0],))
        noise = torch.randn_like(x0)
        ab = _per_sample(alpha_bar[t], x0).to(x0.dtype)
        target = x0 if forget == "eps target" else noise
        loss = ((target - model(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t)) ** 2).mean()
        if forget != "zero_grad":
            optimizer.zero_grad()
        loss.backward()
        if forget != "step":
            optimizer.step()
        return loss.detach()
    return step


def _step_on_course_data(model, optimizer, x0, alpha_bar):
    """A shortcut: trains on the lesson's ring of 8 Gaussians instead of the batch it is given."""
    from ..data import ring_of_gaussians

    return ref_train_step(model, optimizer, ring_of_gaussians(8, 1.0, 0.08).sample(len(x0)), alpha_bar)


def _fake_loss_step(*args):
    """A shortcut for any training-step exercise: reports a falling loss and never trains."""
    _fake_loss_step.calls = getattr(_fake_loss_step, "calls", 0) + 1
    return 1.0 / _fake_loss_step.calls


# ---- lesson 3: the sampling loop ----------------------------------------------------------------------------------

def ref_sample_loop(denoise, x, sigmas):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), first order on the first and the last step: one denoiser
    call per step."""
    prev = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = denoise(x, s)
        if s_next == 0:
            return d
        h = math.log(s / s_next)
        if prev is None:
            dd = d
        else:
            r = math.log(float(sigmas[i - 1]) / s) / h
            dd = (1 + 1 / (2 * r)) * d - prev / (2 * r)
        x = (s_next / s) * x - math.expm1(-h) * dd
        prev = d
    return x


def assess_sample_loop(task, outputs: list) -> CheckResult | None:
    """Lesson 3: the samples reach the quality floor on the task's mixture, every mode gets its share, and the samples
    spread around their modes as the data do (not collapsed onto the mode centres)."""
    name, mix = "sample_loop", task.private["mixture"]
    x = outputs[0]
    verdict = _points_or_verdict(name, x)
    if verdict:
        return verdict
    hq, counts, spread = _quality(x, mix)
    fair = MODE_SHARE * _T.SAMPLE_POINTS / len(mix.modes)
    calls = len(task.calls[0].oracles["denoise"].log)
    if hq >= SAMPLE_HQ_FLOOR and bool((counts >= fair).all()):
        if spread >= SPREAD_FLOOR:
            return None
        return CheckResult(name, FAILED, f"your samples sit {spread:.2f} standard deviations from their modes (RMS); "
                           f"samples of the data sit about 1.4 from theirs (accepted: {SPREAD_FLOOR:g} or more).",
                           "Return the points the last step lands on, not their modes or averages: the last step (to "
                           "sigma = 0) lands on denoise(x, sigma).")
    return CheckResult(name, FAILED, f"{hq:.0%} of your samples land near one of the {len(mix.modes)} modes (need "
                       f"{SAMPLE_HQ_FLOOR:.0%}), and the emptiest mode holds {int(counts.min())} of "
                       f"{_T.SAMPLE_POINTS} (need {fair:.0f}); {calls} denoiser calls for {task.private['nfe']} steps.",
                       "Step through every pair (sigma, sigma_next): the Euler step is x + (sigma_next - sigma) "
                       "(x - denoise(x, sigma)) / sigma, and the last step (to sigma = 0) lands on denoise(x, sigma).")


def _one_shot_loop(denoise, x, sigmas):
    """A shortcut: one call at the largest noise level (the posterior mean of everything: the data's mean)."""
    return denoise(x, float(sigmas[0]))


def _no_call_loop(denoise, x, sigmas):
    """A shortcut: never calls the denoiser; returns the noise scaled to unit variance."""
    return x / sigmas[0]


def _course_data_loop(denoise, x, sigmas):
    """A shortcut: returns samples of the lesson's own ring of 8 Gaussians."""
    from ..data import ring_of_gaussians

    return ring_of_gaussians(8, 1.0, 0.08).sample(len(x), torch.Generator().manual_seed(0))


def _euler(denoise, x, sigmas):
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = denoise(x, s)
        x = d if s_next == 0 else x + (s_next - s) * (x - d) / s
    return x


def _snapped_loop(denoise, x, sigmas):
    """A shortcut: samples honestly, then moves every point to the centre of its cluster (mean shift: the modes,
    found by the sampler)."""
    x = _euler(denoise, x, sigmas)
    y = x.clone()
    for _ in range(30):
        w = torch.exp(-torch.cdist(y, x).pow(2) / (2 * 0.1**2))
        y = (w @ x) / w.sum(1, keepdim=True)
    return y


def _heun_loop(denoise, x, sigmas):
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (x - denoise(x, s)) / s
        x_euler = x + (s_next - s) * d
        x = x_euler if s_next == 0 else x + (s_next - s) * (d + (x_euler - denoise(x_euler, s_next)) / s_next) / 2
    return x


# ---- lesson 4: the VAE step ---------------------------------------------------------------------------------------

def ref_vae_step(vae, optimizer, x):
    """One step on the negative ELBO (Kingma & Welling 2014, eq. 3 and 10): reparameterised z, Gaussian decoder
    log-likelihood with its learned scale, KL to N(0, I)."""
    mu, logvar = vae.encode(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    mean, log_scale = vae.decode(z)
    nll = (0.5 * ((x - mean) / log_scale.exp()) ** 2 + log_scale + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    loss = (nll + kl).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def assess_vae_step(task, outputs: list) -> CheckResult | None:
    """Lesson 4: the loss went down and the trained VAE's ELBO on held-out points of the task's mixture is within
    ELBO_GAP nats of their exact log-likelihood (the ELBO measured here, with course_lib.vae.elbo, not the learner's)."""
    from ..vae import elbo

    name, seed, mix = "vae_step", task.private["seed"], task.private["mixture"]
    vae, verdict = _trained_or_verdict(name, outputs, _H.vae_net(seed))
    if verdict:
        return verdict
    x = mix.sample(4000, torch.Generator().manual_seed(seed + 9))
    with torch.no_grad():
        e = elbo(vae, x, n_z=8, generator=torch.Generator().manual_seed(seed + 10))
    bound, exact = float(e["elbo"].mean()), float(mix.log_prob(x).mean())
    if bound >= exact - ELBO_GAP:
        return None
    return CheckResult(name, FAILED, f"the trained VAE's held-out ELBO is {bound:.3g} nats per point; the data's exact "
                       f"log-likelihood is {exact:.3g}, and a correct step gets within {ELBO_GAP:g} of it "
                       f"(KL {float(e['kl'].mean()):.3g} nats).",
                       "Minimise the negative ELBO of the batch you are given: z = mu + exp(logvar / 2) * noise; the "
                       "decoder's Gaussian negative log-likelihood 0.5 ((x - mean) / exp(log_scale))^2 + log_scale + "
                       "0.5 log(2 pi), summed over dimensions, plus the KL 0.5 (mu^2 + exp(logvar) - 1 - logvar) summed "
                       "over latents.")


def _vae_step_forgetting(forget: str):
    """The reference VAE step with one usual mistake."""
    def step(vae, optimizer, x):
        mu, logvar = vae.encode(x)
        z = mu + (logvar if forget == "std" else torch.exp(0.5 * logvar)) * torch.randn_like(mu)
        mean, log_scale = vae.decode(z)
        nll = (0.5 * ((x - mean) / log_scale.exp()) ** 2 + log_scale).sum(1)
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
        loss = (nll + (0 if forget == "kl" else kl)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def _vae_on_course_data(vae, optimizer, x):
    """A shortcut: trains on the lesson's ring of 8 Gaussians instead of the batch it is given."""
    from ..data import ring_of_gaussians

    return ref_vae_step(vae, optimizer, ring_of_gaussians(8, 1.0, 0.08).sample(len(x)))


_SAMPLERS = ("course_lib.samplers.sample", "course_lib.samplers.sample_euler", "course_lib.samplers.sample_ddim",
             "course_lib.samplers.sample_dpmpp_2m", "course_lib.samplers.sample_heun",
             "course_lib.samplers.sample_euler_ancestral", "course_lib.samplers.sample_dpmpp_2m_sde",
             "course_lib.samplers.sample_dpmpp_3m_sde", "course_lib.kernels.ddim_step", "course_lib.kernels.euler_step",
             "course_lib.kernels.dpmpp_2m_step")
register(Exercise(
    "train_step", 2, ref_train_step, None,
    "One training step: draw t and the noise, noise x0 to x_t, take the mean squared error between model(x_t, t) "
    "and the noise, then zero_grad, backward, step. Return the loss.",
    mistakes=((_step_forgetting("step"), "optimizer.step()"), (_step_forgetting("zero_grad"), "zero_grad"),
              (_step_forgetting("eps target"), "predict the noise")),
    shortcuts=((_fake_loss_step, "never changed"), (_step_on_course_data, "samples from the trained network are poor")),
    trials=1, task=lambda gen: _T.training_task(gen, "train_diffusion"), assess=assess_train_step, seconds=120.0,
    passed_message=f"{_T.TRAIN_STEPS} of your steps trained a network whose samples cover every mode of a fresh "
                   f"mixture with at least {TRAIN_HQ_FLOOR:.0%} of them near a mode."))
register(Exercise(
    "sample_loop", 3, ref_sample_loop, None,
    "A whole sampler: for each pair (sigma, sigma_next) call denoise once and move x towards sigma_next "
    "(Euler / DDIM, or DPM-Solver++(2M)); return x at sigma = 0. Heun's two calls per step exceed the budget.",
    mistakes=((_one_shot_loop, "Step through every pair"), (_heun_loop, "budget")),
    shortcuts=((_no_call_loop, "land near one of"), (_course_data_loop, "land near one of"),
               (_one_shot_loop, "land near one of"), (_snapped_loop, "standard deviations from their modes"),
               (_heun_loop, "more than the budget")),
    trials=2, task=_T.sampling_task, assess=assess_sample_loop, evidence=_T.off_schedule, seconds=60.0,
    refused=SAMPLER_LIBRARIES, rule=SAMPLER_RULE,
    passed_message=f"within the budget of one denoiser call per step, your samples of two fresh mixtures fill "
                   f"every mode with at least {SAMPLE_HQ_FLOOR:.0%} of them near a mode, spread as the data are."))
register(Exercise(
    "vae_step", 4, ref_vae_step, None,
    "One step on the negative ELBO: encode, reparameterise, decode, Gaussian negative log-likelihood plus KL, "
    "then zero_grad, backward, step. Return the loss.",
    mistakes=((_vae_step_forgetting("kl"), "plus the KL"), (_vae_step_forgetting("std"), "exp(logvar / 2)")),
    shortcuts=((_vae_on_course_data, "held-out ELBO"),),
    trials=1, task=lambda gen: _T.training_task(gen, "train_vae"), assess=assess_vae_step, seconds=120.0,
    passed_message=f"{_T.TRAIN_STEPS} of your steps trained a VAE whose held-out ELBO is within {ELBO_GAP:g} nats "
                   f"of the data's exact log-likelihood."))
LIBRARY_EQUIVALENTS.update({
    "train_step": ("course_lib.losses.diffusion_loss", "course_lib.train.Trainer.train_step",
                   "course_lib.families.diffusion.DiffusionFamily.loss"),
    "sample_loop": _SAMPLERS,
    "vae_step": ("course_lib.vae.elbo", "course_lib.train.Trainer.train_step"),
})
