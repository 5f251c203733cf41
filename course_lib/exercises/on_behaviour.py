"""Exercises graded on behaviour (lessons 2, 3, 4): a training step, a sampling loop, a VAE step."""
from __future__ import annotations

import math

import torch

from ..grading import harnesses as _H
from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register
from .common import _per_sample

# ---- exercises graded on behaviour -------------------------------------------------------------------------------
# The learner's function runs inside a fixed procedure (course_lib.grading.harnesses: a short training run, or a
# sampling run with a counted budget) and the verdict comes from what it produced: the trained weights are loaded
# into a fresh network here and sampled or scored with the library's own code. Thresholds were calibrated on the
# reference solution and on the usual mistakes (tests/test_exercises.py runs both).


TRAIN_HQ_FLOOR = 0.6  # the reference step reaches 0.86-0.96 in this budget; the usual mistakes stay below 0.1
SAMPLE_HQ_FLOOR = 0.7  # a plain Euler loop reaches 0.79 at worst over 200 random tasks (mean 0.89); one step: 0
ELBO_GAP = 2.0  # nats below the data's exact mean log-likelihood; the reference step is 0.8-1.4 below, mistakes > 3
MODE_SHARE = 0.4  # every mode must hold at least this share of its fair n / k samples


def _task_inputs(gen) -> dict:
    return {"seed": int(torch.randint(0, 2**31 - 1, (1,), generator=gen)),
            "k": int(torch.randint(4, 7, (1,), generator=gen)),
            "angle": round(float(torch.rand(1, generator=gen)) * 2 * math.pi, 4)}


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


def _trained_or_verdict(name: str, outputs: dict, net):
    """(the trained network, None), or (None, the verdict on what went wrong with the training run)."""
    got, why = _trained(outputs, net)
    if why:
        return None, CheckResult(name, FAILED, why + ".", "Train the network you are given in place; do not replace it.")
    net, changed = got
    return net, _losses_verdict(name, outputs.get("losses", torch.zeros(0)).double(), changed)


def _trained(outputs: dict, net):
    """Load the harness's returned weights into a fresh `net`; (net, weights changed?) or a message why not."""
    params = {k[len("param."):]: v for k, v in outputs.items() if k.startswith("param.")}
    init = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        net.load_state_dict(params, strict=True)
    except (RuntimeError, KeyError, TypeError) as e:
        return None, f"the trained network came back with different weights or shapes ({str(e)[:120]})"
    if not all(torch.isfinite(v).all() for v in params.values()):
        return None, "the trained network's weights contain NaN or infinity"
    changed = any(not torch.equal(init[k], params[k]) for k in init)
    return (net.eval(), changed), None


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


def assess_train_step(inputs: dict, outputs: dict) -> CheckResult | None:
    """Lesson 2: the loss went down, and samples of the trained network (DDPM, every step) reach the quality floor."""
    from .. import metrics
    from ..samplers import sample
    from ..schedules import NoiseSchedule

    name = "train_step"
    net, verdict = _trained_or_verdict(name, outputs, _H.denoiser_net(inputs["seed"]))
    if verdict:
        return verdict
    schedule = NoiseSchedule.named("cosine", _H.T_TRAIN)
    noise = torch.randn(_H.SAMPLE_POINTS, 2, generator=torch.Generator().manual_seed(inputs["seed"] + 3))
    mix = _H.task_mixture(inputs["k"], inputs["angle"])
    try:
        with torch.no_grad():
            x = sample(net, noise, schedule, "ddpm", timesteps=list(range(_H.T_TRAIN - 1, -1, -1)), clip=1.5,
                       generator=torch.Generator().manual_seed(inputs["seed"] + 4)).x
        hq, counts = metrics.hq_fraction(x, mix), metrics.mode_counts(x, mix)
    except FloatingPointError:
        hq, counts = 0.0, torch.zeros(inputs["k"])
    fair = MODE_SHARE * _H.SAMPLE_POINTS / inputs["k"]
    if hq >= TRAIN_HQ_FLOOR and bool((counts >= fair).all()):
        return None
    return CheckResult(name, FAILED, f"the loss went down, but samples from the trained network are poor: {hq:.0%} "
                       f"land near one of the {inputs['k']} modes (need {TRAIN_HQ_FLOOR:.0%}), and the emptiest mode "
                       f"holds {int(counts.min())} of {_H.SAMPLE_POINTS} (need {fair:.0f}).",
                       "The network must learn to predict the noise: draw t uniformly from 0 .. T-1 (one per "
                       "sample), x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, and minimise the mean squared error "
                       "between model(x_t, t) and that noise.")


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


def assess_sample_loop(inputs: dict, outputs: dict) -> CheckResult | None:
    """Lesson 3: the samples reach the quality floor on the exact denoiser within the budget, every mode filled."""
    from .. import metrics

    name = "sample_loop"
    x = outputs.get("samples")
    want = (_H.SAMPLE_POINTS, 2)
    if x is None or tuple(x.shape) != want:
        return CheckResult(name, FAILED, f"expected the final points, shape {want}, got "
                           f"{None if x is None else tuple(x.shape)}.", "Return x after the last step.")
    if not torch.isfinite(x).all():
        return CheckResult(name, FAILED, "the samples contain NaN or infinity.",
                           "Divide by sigma only while sigma > 0: the last step goes to sigma = 0.")
    mix = _H.task_mixture(inputs["k"], inputs["angle"])
    hq, counts = metrics.hq_fraction(x, mix), metrics.mode_counts(x, mix)
    fair = MODE_SHARE * _H.SAMPLE_POINTS / inputs["k"]
    if hq >= SAMPLE_HQ_FLOOR and bool((counts >= fair).all()):
        return None
    return CheckResult(name, FAILED, f"{hq:.0%} of your samples land near one of the {inputs['k']} modes (need "
                       f"{SAMPLE_HQ_FLOOR:.0%}), and the emptiest mode holds {int(counts.min())} of "
                       f"{_H.SAMPLE_POINTS} (need {fair:.0f}); {int(outputs['calls'])} denoiser calls for "
                       f"{inputs['nfe']} steps.",
                       "Step through every pair (sigma, sigma_next): the Euler step is x + (sigma_next - sigma) "
                       "(x - denoise(x, sigma)) / sigma, and the last step (to sigma = 0) lands on denoise(x, sigma).")


def _inputs_sample_loop(gen) -> dict:
    return {**_task_inputs(gen), "sigma_max": round(10 + 20 * float(torch.rand(1, generator=gen)), 3),
            "sigma_min": round(0.01 + 0.04 * float(torch.rand(1, generator=gen)), 4), "rho": 7.0,
            "nfe": int(torch.randint(8, 11, (1,), generator=gen))}


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


def assess_vae_step(inputs: dict, outputs: dict) -> CheckResult | None:
    """Lesson 4: the loss went down and the trained VAE's held-out ELBO is within ELBO_GAP nats of the data's exact
    log-likelihood (the ELBO is measured here, with course_lib.vae.elbo, not from the learner's loss)."""
    from ..vae import elbo

    name = "vae_step"
    vae, verdict = _trained_or_verdict(name, outputs, _H.vae_net(inputs["seed"]))
    if verdict:
        return verdict
    mix = _H.task_mixture(inputs["k"], inputs["angle"])
    x = mix.sample(4000, torch.Generator().manual_seed(inputs["seed"] + 9))
    with torch.no_grad():
        e = elbo(vae, x, n_z=8, generator=torch.Generator().manual_seed(inputs["seed"] + 10))
    bound, exact = float(e["elbo"].mean()), float(mix.log_prob(x).mean())
    if bound >= exact - ELBO_GAP:
        return None
    return CheckResult(name, FAILED, f"the trained VAE's held-out ELBO is {bound:.3g} nats per point; the data's exact "
                       f"log-likelihood is {exact:.3g}, and a correct step gets within {ELBO_GAP:g} of it "
                       f"(KL {float(e['kl'].mean()):.3g} nats).",
                       "Minimise the negative ELBO: z = mu + exp(logvar / 2) * noise; the decoder's Gaussian "
                       "negative log-likelihood 0.5 ((x - mean) / exp(log_scale))^2 + log_scale + 0.5 log(2 pi), "
                       "summed over dimensions, plus the KL 0.5 (mu^2 + exp(logvar) - 1 - logvar) summed over latents.")


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


def _one_shot_loop(denoise, x, sigmas):
    return denoise(x, float(sigmas[0]))


def _heun_loop(denoise, x, sigmas):
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (x - denoise(x, s)) / s
        x_euler = x + (s_next - s) * d
        x = x_euler if s_next == 0 else x + (s_next - s) * (d + (x_euler - denoise(x_euler, s_next)) / s_next) / 2
    return x


register(Exercise(
    "train_step", 2, ref_train_step, _task_inputs,
    "One training step: draw t and the noise, noise x0 to x_t, take the mean squared error between model(x_t, t) "
    "and the noise, then zero_grad, backward, step. Return the loss.",
    mistakes=((_step_forgetting("step"), "optimizer.step()"), (_step_forgetting("zero_grad"), "zero_grad"),
              (_step_forgetting("eps target"), "predict the noise")),
    trials=1, harness="train_diffusion", assess=assess_train_step, seconds=120.0,
    passed_message=f"{_H.TRAIN_STEPS} of your steps trained a network whose samples cover every mode of a fresh "
                   f"mixture with at least {TRAIN_HQ_FLOOR:.0%} of them near a mode."))
register(Exercise(
    "sample_loop", 3, ref_sample_loop, _inputs_sample_loop,
    "A whole sampler: for each pair (sigma, sigma_next) call denoise once and move x towards sigma_next "
    "(Euler / DDIM, or DPM-Solver++(2M)); return x at sigma = 0. Heun's two calls per step exceed the budget.",
    mistakes=((_one_shot_loop, "Step through every pair"), (_heun_loop, "BudgetExceeded")),
    trials=2, harness="sample_with_loop", assess=assess_sample_loop, seconds=60.0,
    passed_message=f"within the budget of one denoiser call per step, your samples of two fresh mixtures fill "
                   f"every mode with at least {SAMPLE_HQ_FLOOR:.0%} of them near a mode."))
register(Exercise(
    "vae_step", 4, ref_vae_step, _task_inputs,
    "One step on the negative ELBO: encode, reparameterise, decode, Gaussian negative log-likelihood plus KL, "
    "then zero_grad, backward, step. Return the loss.",
    mistakes=((_vae_step_forgetting("kl"), "plus the KL"), (_vae_step_forgetting("std"), "exp(logvar / 2)")),
    trials=1, harness="train_vae", assess=assess_vae_step, seconds=120.0,
    passed_message=f"{_H.TRAIN_STEPS} of your steps trained a VAE whose held-out ELBO is within {ELBO_GAP:g} nats "
                   f"of the data's exact log-likelihood."))
LIBRARY_EQUIVALENTS.update({
    "train_step": ("course_lib.losses.diffusion_loss", "course_lib.train.Trainer.train_step"),
    "sample_loop": ("course_lib.samplers.sample", "course_lib.samplers.sample_euler", "course_lib.samplers.sample_ddim",
                    "course_lib.samplers.sample_dpmpp_2m", "course_lib.samplers.sample_heun",
                    "course_lib.samplers.sample_euler_ancestral", "course_lib.samplers.sample_dpmpp_2m_sde",
                    "course_lib.kernels.ddim_step", "course_lib.kernels.euler_step", "course_lib.kernels.dpmpp_2m_step"),
    "vae_step": ("course_lib.vae.elbo", "course_lib.train.Trainer.train_step"),
})
