"""Exercises graded on a training run of the learner's step, beside on_behaviour.py's lessons 2 and 4: lesson 6's
conditional step with label dropout and lesson 9's flow-matching step (lesson 10's masked-diffusion step is in
lesson10.py).

The learner's step trains a small network on a fresh task (course_lib.grading.tasks.training_task) inside the fixed
procedure of course_lib.grading.harnesses; the weights come back here, are loaded into a network of the judge's own and
sampled with the judge's own loop. When the samples miss, the trained field is compared with the fields the usual
mistakes learn (known exactly for a Gaussian mixture), so the hint names the mistake the network actually made.
"""
from __future__ import annotations

import torch

from ..grading import harnesses as _H
from ..grading import tasks as _T
from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register
from .on_behaviour import MODE_SHARE, _fake_loss_step, _quality, _trained_or_verdict

# Calibrated with `python -m course_lib bench exercises` (data/bench_exercises.json: 20 tasks for the reference, 10 for
# each honest variant, 5 for each mistake; one thread)
FLOW_HQ_FLOOR = 0.6  # the reference's samples: 0.79 at worst; training on the course's ring 0.13 at best
FLOW_EULER_STEPS = 100  # the judge samples the trained field with the course's Euler, 100 steps uniform in t
FIELD_ERROR = 0.15  # the trained field's mean squared distance from the exact velocity, relative to its size: the
# reference 0.071 at worst, logit-normal times 0.092; the noise (eps) target 0.20 at best, the other mistakes 0.99+


def ref_flow_step(model, optimizer, x0):
    """One step of conditional flow matching (Lipman et al. 2023, eq. 23; Liu et al. 2023): t ~ U(0, 1) per sample,
    x_t = (1 - t) x0 + t noise, the mean squared error between model(x_t, t) and the path's velocity noise - x0."""
    t = torch.rand(x0.shape[0], 1, dtype=x0.dtype)
    noise = torch.randn_like(x0)
    loss = ((model((1 - t) * x0 + t * noise, t[:, 0]) - (noise - x0)) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def _fields(mix) -> dict:
    """The velocity a network learns with the right step and with each usual mistake, exactly, for a Gaussian
    mixture: from D(x, sigma) = E[x0 | x0 + sigma noise = x], on the path x_t = (1 - t) x0 + t noise (sigma = t / (1 - t),
    x_t / (1 - t) the sigma view) E[x0 | x_t] = D(x_t / (1 - t), t / (1 - t))."""
    from ..analytic import mixture_denoiser

    den = mixture_denoiser(mix)

    def x0_hat(x, t):
        return den(x / (1 - t), t / (1 - t))

    def velocity(x, t):  # E[noise - x0 | x_t] = (x_t - E[x0 | x_t]) / t
        return (x - x0_hat(x, t)) / t

    return {"right": velocity,
            "flipped": lambda x, t: -velocity(x, t),
            "noise": lambda x, t: (x - (1 - t) * x0_hat(x, t)) / t,
            "swapped": lambda x, t: velocity(x, 1 - t)}


_MISTAKE_HINTS = {
    "flipped": "Your network learned the velocity with the wrong sign: t = 0 is the data and t = 1 the noise, so the "
               "path's velocity d x_t / dt is noise - x0.",
    "noise": "Your network learned to predict the noise (diffusion's eps target); flow matching regresses on the "
             "velocity noise - x0.",
    "swapped": "Your network learned the path backwards in time: x_t = (1 - t) x0 + t noise (t = 0 the data, t = 1 "
               "the noise), and model(x_t, t) gets that same t.",
}


@torch.no_grad()
def _closest_field(net, mix, seed: int) -> tuple[str, dict]:
    """Which field the trained network is nearest to, by mean squared distance at points of the path (t in 0.1 ..
    0.9), each field's distance relative to the size of the right velocity there."""
    g = torch.Generator().manual_seed(seed + 21)
    fields = _fields(mix)
    err, size = {name: 0.0 for name in fields}, 0.0
    for t in torch.linspace(0.1, 0.9, 9, dtype=torch.float64).tolist():
        x0, noise = mix.sample(400, g).double(), torch.randn(400, 2, generator=g, dtype=torch.float64)
        x = (1 - t) * x0 + t * noise
        got = net(x.float(), torch.full((400,), t)).double()
        size += float(fields["right"](x, t).pow(2).mean())
        for name, f in fields.items():
            err[name] += float((got - f(x, t)).pow(2).mean())
    rel = {name: e / size for name, e in err.items()}
    return min(rel, key=rel.get), rel


def flow_measure(task, outputs: list) -> tuple[CheckResult | None, dict]:
    """The training run's verdict if it went wrong (else None), and what the judge measures of the trained field: the
    samples' high-quality share and emptiest mode (as a share of its fair n / k), the field's relative distance from
    the exact velocity and from each mistake's, and the field it is nearest to."""
    seed, mix = task.private["seed"], task.private["mixture"]
    net, verdict = _trained_or_verdict("flow_step", outputs, _H.flow_net(seed))
    if verdict:
        return verdict, {}
    from ..samplers import sample

    noise = torch.randn(_T.SAMPLE_POINTS, 2, generator=torch.Generator().manual_seed(seed + 3))
    with torch.no_grad():  # Euler, uniform in t: net.net is the flow-prediction network inside the exercise's wrapper
        x = sample(net.net, noise, sampler="euler", steps=FLOW_EULER_STEPS, spacing="uniform").x
    hq, counts, _ = _quality(x, mix) if torch.isfinite(x).all() else (0.0, torch.zeros(len(mix.modes)), 0.0)
    learned, rel = _closest_field(net, mix, seed)
    return None, {"hq": hq, "emptiest": float(counts.min()) * len(mix.modes) / _T.SAMPLE_POINTS,
                  "field_error": rel["right"], "learned": learned, "modes": len(mix.modes),
                  "emptiest_count": int(counts.min())}


def assess_flow_step(task, outputs: list) -> CheckResult | None:
    """Lesson 9: the loss went down; samples of the trained field (Euler, 100 steps) reach the quality floor on the
    task's mixture, every mode filled; and the field is within FIELD_ERROR of the mixture's exact velocity. Otherwise
    the hint names the field the network learned."""
    verdict, m = flow_measure(task, outputs)
    if verdict:
        return verdict
    if m["hq"] >= FLOW_HQ_FLOOR and m["emptiest"] >= MODE_SHARE and m["field_error"] <= FIELD_ERROR:
        return None
    fair = MODE_SHARE * _T.SAMPLE_POINTS / m["modes"]
    what = (f"samples of the trained velocity field (Euler, {FLOW_EULER_STEPS} steps from t = 1 to 0): {m['hq']:.0%} "
            f"land near one of the {m['modes']} modes of the data (need {FLOW_HQ_FLOOR:.0%}), the emptiest mode holds "
            f"{m['emptiest_count']} of {_T.SAMPLE_POINTS} (need {fair:.0f}); the field's mean squared distance from "
            f"the data's exact velocity is {m['field_error']:.0%} of that velocity's own (accepted: {FIELD_ERROR:.0%})")
    return CheckResult("flow_step", FAILED, f"the loss went down, but {what}.",
                       _MISTAKE_HINTS.get(m["learned"], "Train on the batch you are given: one t ~ U(0, 1) per "
                                          "sample, x_t = (1 - t) x0 + t noise, and minimise the mean squared error "
                                          "between model(x_t, t) and noise - x0."))


def _flow_step_with(mistake: str):
    """The reference step with one usual mistake (for the tests and the hints)."""
    def step(model, optimizer, x0):
        t = torch.rand(x0.shape[0], 1)
        noise = torch.randn_like(x0)
        x_t = t * x0 + (1 - t) * noise if mistake == "swapped" else (1 - t) * x0 + t * noise
        target = {"flipped": x0 - noise, "noise": noise}.get(mistake, noise - x0)
        loss = ((model(x_t, t[:, 0]) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        if mistake != "step":
            optimizer.step()
        return loss.detach()
    return step


def _flow_on_course_data(model, optimizer, x0):
    """A shortcut: trains on the lesson's ring of 8 Gaussians instead of the batch it is given."""
    from ..data import ring_of_gaussians

    return ref_flow_step(model, optimizer, ring_of_gaussians(8, 1.0, 0.08).sample(len(x0)))


register(Exercise(
    "flow_step", 9, ref_flow_step, None,
    "One flow-matching step: one t ~ U(0, 1) per sample, x_t = (1 - t) x0 + t noise, the mean squared error between "
    "model(x_t, t) and noise - x0, then zero_grad, backward, step. Return the loss.",
    mistakes=((_flow_step_with("flipped"), "wrong sign"), (_flow_step_with("noise"), "eps target"),
              (_flow_step_with("swapped"), "backwards in time"), (_flow_step_with("step"), "optimizer.step()")),
    shortcuts=((_fake_loss_step, "never changed"), (_flow_on_course_data, "samples of the trained velocity field")),
    trials=1, task=lambda gen: _T.training_task(gen, "train_flow"), assess=assess_flow_step, seconds=120.0,
    passed_message=f"{_T.TRAIN_STEPS} of your steps trained a velocity field close to a fresh mixture's exact one, whose "
                   f"Euler samples cover every mode with at least {FLOW_HQ_FLOOR:.0%} of them near a mode."))
LIBRARY_EQUIVALENTS.update({
    "flow_step": ("course_lib.flow.flow_matching_loss", "course_lib.flow.velocity_target", "course_lib.flow.interpolate",
                  "course_lib.train.Trainer.train_step", "course_lib.families.flow.FlowFamily.step"),
})


# ---- lesson 6: the conditional training step with label dropout ------------------------------------------------------

COND_STEPS, GUIDE_SCALE = 30, 3.0  # the judge samples with Euler on 30 Karras levels, unguided and at scale 3
COND_SHARE = 0.4  # unguided label accuracy, as a share of the way from chance (1 / k) to exact sampling's: the
# reference reaches 0.62 at worst over 20 tasks; a network that ignores the labels about 0
COND_GAIN = 0.1  # the share of the gap to 100% that guidance at scale 3 must close: the reference 0.83 at worst over
# 20 tasks, 10% dropout (an honest variant) 0.40 at worst over 30; it says guidance helps, while a step without dropout
# is caught by the next check (its gain ranged from negative to 1.0: an untrained 'no label' embedding sometimes acts
# as an unconditional model)
UNCOND_ERROR = 0.04  # the 'no label' prediction's mean squared distance from the exact unconditional denoiser, relative
# to the size of the denoising step, at sigma 0.2, 0.5, 1 and 2: the reference 0.003-0.016 (20 tasks), the honest
# variants up to 0.015; without dropout 0.085-0.58


def _cond_step(model, optimizer, x0, y, alpha_bar, null_label, p_drop: float = 0.2, take_step: bool = True):
    """Lesson 2's training step on labelled data, each label replaced by null_label with probability p_drop."""
    y = torch.where(torch.rand(len(y)) < p_drop, torch.full_like(y, null_label), y)
    t = torch.randint(0, len(alpha_bar), (x0.shape[0],))
    noise = torch.randn_like(x0)
    ab = alpha_bar[t][:, None].to(x0.dtype)
    loss = ((noise - model(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t, y)) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    if take_step:
        optimizer.step()
    return loss.detach()


def ref_cond_train_step(model, optimizer, x0, y, alpha_bar, null_label):
    """One step of conditional DDPM training with label dropout (Ho & Salimans 2022, Algorithm 1): each label is
    replaced by null_label with probability 0.2, so one network learns the conditional and the unconditional model."""
    return _cond_step(model, optimizer, x0, y, alpha_bar, null_label)


def cond_measure(task, outputs: list) -> tuple[CheckResult | None, dict]:
    """The training run's verdict if it went wrong (else None), and what the judge measures: the label accuracy of
    unguided and guided samples (the share nearest to the mode of the label asked for), exact sampling's, and the
    share of the gap to 100% that guidance closed."""
    from ..guidance import classifier_free
    from ..metrics import nearest_mode
    from ..samplers import as_denoiser, karras_sigmas, sample
    from ..schedules import NoiseSchedule

    p = task.private
    seed, mix, k = p["seed"], p["mixture"], len(p["mixture"].modes)
    net, verdict = _trained_or_verdict("cond_train_step", outputs, _H.conditional_net(seed, k))
    if verdict:
        return verdict, {}
    schedule = NoiseSchedule.named("cosine", _T.T_TRAIN)
    den = as_denoiser(net, schedule)
    sigmas = karras_sigmas(COND_STEPS, den.sigma_min, den.sigma_max)
    labels = torch.arange(_T.SAMPLE_POINTS) % k
    noise = torch.randn(_T.SAMPLE_POINTS, 2, generator=torch.Generator().manual_seed(seed + 3))
    measured = {"expected": p["expected_accuracy"]}
    with torch.no_grad():
        for key, model in (("acc_unguided", den), ("acc_guided", classifier_free(den, GUIDE_SCALE, null_label=k))):
            x = sample(model, noise, sampler="euler", sigmas=sigmas, model_kwargs={"y": labels}).x
            finite = torch.isfinite(x).all(1)
            measured[key] = float(((nearest_mode(x.nan_to_num(), mix)[0] == labels) & finite).float().mean())
    measured["gain"] = (measured["acc_guided"] - measured["acc_unguided"]) / max(1 - measured["acc_unguided"], 1e-9)
    measured["share"] = (measured["acc_unguided"] - 1 / k) / max(measured["expected"] - 1 / k, 1e-9)
    measured["uncond_error"] = _uncond_error(den, mix, k, seed)
    return None, measured


@torch.no_grad()
def _uncond_error(den, mix, k: int, seed: int) -> float:
    """How far the network's 'no label' prediction is from the mixture's exact unconditional denoiser: mean squared
    distance relative to the size of the exact denoising step, on noisy data at sigma 0.2, 0.5, 1 and 2."""
    from ..analytic import mixture_denoiser

    exact, g, err, size = mixture_denoiser(mix), torch.Generator().manual_seed(seed + 7), 0.0, 0.0
    for sigma in (0.2, 0.5, 1.0, 2.0):
        x = mix.sample(1000, g) + sigma * torch.randn(1000, 2, generator=g)
        want = exact(x.double(), sigma).float()
        err += float((den(x, sigma, y=torch.full((1000,), k)) - want).pow(2).mean())
        size += float((x - want).pow(2).mean())
    return err / size


def assess_cond_train_step(task, outputs: list) -> CheckResult | None:
    """Lesson 6: unguided samples of the trained network are nearest to their label's mode well above chance (COND_SHARE
    of the way from chance to exact sampling of p(x | y)); called with 'no label' it is the data's unconditional
    denoiser (UNCOND_ERROR), which only label dropout trains; and guidance at scale 3 closes COND_GAIN of the gap to
    100%."""
    verdict, m = cond_measure(task, outputs)
    if verdict:
        return verdict
    acc1, acc3, expected = m["acc_unguided"], m["acc_guided"], m["expected"]
    unguided = (f"the trained network's unguided samples are nearest to the mode of their label {acc1:.0%} of the "
                f"time, {m['share']:.0%} of the way from chance ({1 / len(task.private['mixture'].modes):.0%}) to exact "
                f"samples of p(x | y) ({expected:.0%}); accepted: {COND_SHARE:.0%} of the way")
    dropout = ("Label dropout: replace each label by null_label with a small probability (say 0.2) before calling the "
               "network, so that the same network learns the unconditional model that guidance pushes away from.")
    if m["share"] < COND_SHARE:
        return CheckResult("cond_train_step", FAILED, f"{unguided}.",
                           "Pass the labels to the network (model(x_t, t, y)) and drop only a share of them (say "
                           "20%) to null_label: the network must learn p(x | y) for every label as well as p(x).")
    if m["uncond_error"] > UNCOND_ERROR:
        return CheckResult("cond_train_step", FAILED, f"called with null_label, the trained network is not the data's "
                           f"unconditional denoiser: its squared distance from the exact one is "
                           f"{m['uncond_error']:.0%} of the size of the denoising step (accepted: {UNCOND_ERROR:.0%}).",
                           dropout)
    if m["gain"] < COND_GAIN:
        return CheckResult("cond_train_step", FAILED, f"guided at scale {GUIDE_SCALE:g}, {acc3:.0%} of the samples are "
                           f"nearest to their label's mode against {acc1:.0%} unguided: guidance closed "
                           f"{max(m['gain'], 0):.0%} of the gap to 100% (need {COND_GAIN:.0%}).", dropout)
    return None


def _cond_step_with(mistake: str):
    """The reference step with one usual mistake (for the tests and the hints)."""
    options = {"no dropout": {"p_drop": 0.0}, "drop all": {"p_drop": 1.0}, "step": {"take_step": False}}[mistake]
    return lambda model, optimizer, x0, y, alpha_bar, null_label: _cond_step(model, optimizer, x0, y, alpha_bar,
                                                                           null_label, **options)


def _cond_on_course_data(model, optimizer, x0, y, alpha_bar, null_label):
    """A shortcut: trains on the lesson's ring of six overlapping Gaussians, labelled by mode, not the given batch."""
    from ..data import ring_of_gaussians

    x, labels = ring_of_gaussians(6, 1.0, 0.4).sample(len(x0), return_labels=True)
    return ref_cond_train_step(model, optimizer, x, labels % null_label, alpha_bar, null_label)


register(Exercise(
    "cond_train_step", 6, ref_cond_train_step, None,
    "A conditional training step with label dropout: replace each label by null_label with probability 0.2, then "
    "lesson 2's step with the labels passed to the network, model(x_t, t, y). Return the loss.",
    mistakes=((_cond_step_with("no dropout"), "Label dropout"), (_cond_step_with("drop all"), "drop only a share"),
              (_cond_step_with("step"), "optimizer.step()")),
    shortcuts=((_fake_loss_step, "never changed"), (_cond_on_course_data, "nearest to")),
    trials=1, task=_T.conditional_training_task, assess=assess_cond_train_step, seconds=120.0,
    passed_message=f"{_T.TRAIN_STEPS} of your steps trained one network whose unguided samples are nearest to their "
                   f"label's mode far more often than chance, and which guidance at scale {GUIDE_SCALE:g} sharpens."))
LIBRARY_EQUIVALENTS.update({
    "cond_train_step": ("course_lib.losses.diffusion_loss", "course_lib.train.Trainer.train_step",
                        "course_lib.families.diffusion.DiffusionFamily.loss",
                        "course_lib.families.diffusion.DiffusionFamily.step"),
})
