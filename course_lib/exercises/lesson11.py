"""Lesson 11: EDM's preconditioning coefficients and EDM2's post-hoc EMA weights (graded on values), and a training
step with log-normal noise and EDM's weighting (graded on what it trains: a small preconditioned denoiser fitted on a
fresh Gaussian mixture, sampled by the judge's own Heun loop, its reported losses compared with the judge's loss)."""
from __future__ import annotations

import math

import torch

from ..grading import harnesses as _H
from ..grading import tasks as _T
from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register
from .on_behaviour import MODE_SHARE, _fake_loss_step, _quality, _trained_or_verdict

# ---- 11.1 the four preconditioning coefficients -------------------------------------------------------------------


def ref_edm_coefficients(sigma, sigma_data):
    """(c_skip, c_out, c_in, c_noise) of EDM (Karras et al. 2022, Table 1), stacked into a (4, B) tensor:
    sigma_data^2 / (sigma^2 + sigma_data^2), sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    1 / sqrt(sigma^2 + sigma_data^2) and ln(sigma) / 4."""
    total = sigma**2 + sigma_data**2
    return torch.stack([sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4])


def _inputs_coefficients(gen):
    b = int(torch.randint(3, 9, (1,), generator=gen))
    log_sigma = torch.rand(b, generator=gen, dtype=torch.float64) * 10.6 - 6.2  # sigma from 0.002 to 80
    return {"sigma": log_sigma.exp(), "sigma_data": round(float(torch.rand(1, generator=gen)) * 1.5 + 0.2, 3)}


def _coefficients_with(mistake: str):
    def fn(sigma, sigma_data):
        c_skip, c_out, c_in, c_noise = ref_edm_coefficients(sigma, sigma_data)
        if mistake == "c_skip inverted":
            c_skip = sigma**2 / (sigma**2 + sigma_data**2)
        if mistake == "c_out without sigma_data":
            c_out = sigma / (sigma**2 + sigma_data**2).sqrt()
        if mistake == "c_in without sigma_data":
            c_in = 1 / (sigma**2 + 1).sqrt()
        if mistake == "c_noise log10":
            c_noise = sigma.log10() / 4
        return torch.stack([c_skip, c_out, c_in, c_noise])
    return fn


register(Exercise(
    "edm_coefficients", 11, ref_edm_coefficients, _inputs_coefficients,
    "With s2 = sigma^2 + sigma_data^2: c_skip = sigma_data^2 / s2, c_out = sigma * sigma_data / sqrt(s2), "
    "c_in = 1 / sqrt(s2), c_noise = ln(sigma) / 4; return torch.stack([c_skip, c_out, c_in, c_noise]).",
    mistakes=((_coefficients_with("c_skip inverted"), "c_skip is the share of x kept: near 1 when sigma is small "
               "(x is almost the data), near 0 when it is large: sigma_data^2 / (sigma^2 + sigma_data^2)."),
              (_coefficients_with("c_out without sigma_data"), "c_out makes the target (x0 - c_skip x) / c_out unit "
               "variance: its variance before scaling is sigma^2 sigma_data^2 / (sigma^2 + sigma_data^2)."),
              (_coefficients_with("c_in without sigma_data"), "x = x0 + sigma n has variance sigma_data^2 + sigma^2, "
               "not 1 + sigma^2: c_in = 1 / sqrt(sigma^2 + sigma_data^2)."),
              (_coefficients_with("c_noise log10"), "c_noise is the natural log of sigma over 4 (torch.log).")),
    refused=("course_lib.edm", "course_lib.nets.edm_precond"),
    rule="Derive the coefficients yourself: course_lib.edm and nets.EDMPrecond, which compute them, are not allowed in "
         "this exercise."))


# ---- 11.3 post-hoc EMA from two saved averages --------------------------------------------------------------------


def ref_posthoc_ema_weights(t1, gamma1, t2, gamma2, t_target, gamma_target):
    """EDM2's post-hoc reconstruction (Karras et al. 2024, app. C.2) from two saved power-function averages: the
    weights (x1, x2) minimising || x1 p1 + x2 p2 - p_target ||^2 over the profiles p(tau) = (g+1) tau^g / t^(g+1) on
    [0, t]: the 2x2 system A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target>, and
    <p_a, p_b> = (g_a+1)(g_b+1) min(t_a, t_b)^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1))."""
    def inner(ta, ga, tb, gb):
        return math.exp(math.log(ga + 1) + math.log(gb + 1) + (ga + gb + 1) * math.log(min(ta, tb))
                        - math.log(ga + gb + 1) - (ga + 1) * math.log(ta) - (gb + 1) * math.log(tb))

    snaps = [(t1, gamma1), (t2, gamma2)]
    a = torch.tensor([[inner(*p, *q) for q in snaps] for p in snaps], dtype=torch.float64)
    b = torch.tensor([inner(*p, t_target, gamma_target) for p in snaps], dtype=torch.float64)
    return torch.linalg.solve(a, b)


def _gamma(sigma_rel: float) -> float:
    from ..posthoc_ema import gamma_of_sigma_rel

    return round(gamma_of_sigma_rel(sigma_rel), 4)


def _inputs_posthoc(gen):
    """Two snapshots of different widths (sigma_rel 0.04-0.09 and 0.10-0.20) saved at steps 1,000-8,000 and a target
    of width 0.05-0.15 at or before the later snapshot, resampled until the 2x2 system is well conditioned."""
    while True:
        u = torch.rand(5, generator=gen, dtype=torch.float64).tolist()
        t1, t2 = int(1000 + 7000 * u[0]), int(1000 + 7000 * u[1])
        g1, g2 = _gamma(0.04 + 0.05 * u[2]), _gamma(0.10 + 0.10 * u[3])
        inputs = {"t1": t1, "gamma1": g1, "t2": t2, "gamma2": g2,
                  "t_target": int(min(t1, t2) + (max(t1, t2) - min(t1, t2)) * u[4]),
                  "gamma_target": _gamma(0.05 + 0.10 * float(torch.rand(1, generator=gen)))}
        from ..posthoc_ema import profile_inner

        a = torch.tensor([[profile_inner(t1, g1, t1, g1), profile_inner(t1, g1, t2, g2)],
                          [profile_inner(t2, g2, t1, g1), profile_inner(t2, g2, t2, g2)]], dtype=torch.float64)
        if float(torch.linalg.cond(a)) < 200:
            return inputs


def _posthoc_with(mistake: str):
    def fn(t1, gamma1, t2, gamma2, t_target, gamma_target):
        def inner(ta, ga, tb, gb):
            if mistake == "unnormalised":  # integral of tau^ga tau^gb on [0, min]: the (g+1)/t^(g+1) forgotten
                return min(ta, tb) ** (ga + gb + 1) / (ga + gb + 1) / max(ta, tb) ** (ga + gb + 1)
            top = max(ta, tb) if mistake == "max" else min(ta, tb)
            return ((ga + 1) * (gb + 1) * top ** (ga + gb + 1) / ((ga + gb + 1) * ta ** (ga + 1) * tb ** (gb + 1)))

        snaps = [(t1, gamma1), (t2, gamma2)]
        a = torch.tensor([[inner(*p, *q) for q in snaps] for p in snaps], dtype=torch.float64)
        b = torch.tensor([inner(*p, t_target, gamma_target) for p in snaps], dtype=torch.float64)
        if mistake == "b over A transposed":
            return torch.linalg.solve(a.T @ a, b)
        x = torch.linalg.solve(a, b)
        return x / x.sum() if mistake == "renormalised" else x
    return fn


register(Exercise(
    "posthoc_ema_weights", 11, ref_posthoc_ema_weights, _inputs_posthoc,
    "Build the 2x2 Gram matrix A_ij = <p_i, p_j> and b_i = <p_i, p_target> with <p_a, p_b> = (g_a+1)(g_b+1) "
    "min(t_a, t_b)^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1)) (compute it through logs: the powers are huge), "
    "and return the solution of A x = b as a tensor of two numbers.",
    mistakes=((_posthoc_with("unnormalised"), "Each profile is normalised to integrate to 1: p(tau) = (g+1) tau^g / "
               "t^(g+1); keep those factors in the inner product."),
              (_posthoc_with("max"), "A profile is zero after its own t: the product of two is nonzero only up to the "
               "earlier one, min(t_a, t_b)."),
              (_posthoc_with("renormalised"), "Do not rescale the weights to sum to 1: the least-squares solution is "
               "the answer (its sum is close to 1, not exactly)."),
              (_posthoc_with("b over A transposed"), "Solve A x = b (A is symmetric), not the normal equations of A.")),
    rtol=1e-4, atol=1e-8,
    refused=("course_lib.posthoc_ema",),
    rule="Derive the inner products yourself: course_lib.posthoc_ema, which computes these weights, is not allowed in "
         "this exercise; torch.linalg and numpy are."))


# ---- 11.2 the EDM training step, graded on what it trains ---------------------------------------------------------

# Calibrated by `python -m course_lib bench exercises --only edm_step` (data/bench_exercises.json; one thread, 3.5-5 s a
# check): the reference 20/20 (hq 0.88-0.97, emptiest mode 0.64-0.85 of fair, loss ratio 0.985-1.03), two honest styles
# 10/10 each; no weighting: ratio 0.11-0.18, the eps-loss's weight: ratio 0.52-0.63 (their samples are fine: hq
# 0.84-0.96); noise not scaled by sigma: hq 0; noise levels uniform in [0.002, 80] and no optimizer.step(): the loss does
# not fall; every mistake 0 passed with its own hint; both shortcuts 0/3
EDM_HQ_FLOOR = 0.6  # share of the judge's Heun samples within 3 std of a mode
EDM_HEUN_STEPS = 18  # the judge's sampler: Heun, 18 steps (35 network calls), Karras levels from 80 to 0.002
EDM_LOSS_RATIO = (0.8, 1.25)  # the learner's last 200 reported losses over the judge's EDM loss of the trained
# network (log-normal sigmas of the task, EDM weighting) on fresh points


def ref_edm_step(model, optimizer, x0, p_mean, p_std):
    """One step of EDM training (Karras et al. 2022, sec. 5 and eq. 2, 8): ln sigma ~ N(p_mean, p_std^2) per row,
    x = x0 + sigma n, the denoiser's squared error weighted by lambda(sigma) = (sigma^2 + sigma_data^2) /
    (sigma sigma_data)^2, averaged; then zero_grad, backward, step."""
    sigma = (p_mean + p_std * torch.randn(x0.shape[0], dtype=x0.dtype)).exp()
    noise = torch.randn_like(x0)
    sd = model.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    loss = (weight[:, None] * (model(x0 + sigma[:, None] * noise, sigma) - x0) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def edm_task(gen: torch.Generator) -> _T.Task:
    """A fresh separated mixture (tasks.separated_mixture), the log-normal's mean in [-1.6, -0.8] and std in
    [0.9, 1.4], and sigma_data the pool's std; the harness trains the small EDM denoiser (harnesses.edm_net)."""
    task = _T.training_task(gen, "train_edm")
    call = task.calls[0]
    data = call.inputs["data"]
    call.inputs.update(sigma_data=round(float(data.std()), 4), p_mean=round(-1.6 + 0.8 * float(torch.rand(1, generator=gen)), 3),
                       p_std=round(0.9 + 0.5 * float(torch.rand(1, generator=gen)), 3))
    task.private.update({k: call.inputs[k] for k in ("sigma_data", "p_mean", "p_std")})
    return task


def edm_measure(task, outputs: list) -> tuple[CheckResult | None, dict]:
    """The run's verdict if it went wrong (else None); the judge's Heun samples' high-quality share and emptiest mode,
    and the ratio of the learner's reported losses to the judge's EDM loss of the trained network."""
    from ..edm import draw_sigmas, edm_loss
    from ..samplers import sample

    p, mix = task.private, task.private["mixture"]
    net, verdict = _trained_or_verdict("edm_step", outputs, _H.edm_net(p["seed"], p["sigma_data"]))
    if verdict and "did not go down" in verdict.message:  # EDM's weighted loss stays near 1 at any noise level it
        # cannot learn: a flat loss here is usually noise levels drawn outside the log-normal
        return CheckResult("edm_step", FAILED, verdict.message, "EDM's weighted loss falls only where the network "
                           "can learn: draw the noise levels log-normally, sigma = exp(p_mean + p_std * randn), one per "
                           "row; and zero_grad, backward, step each time."), {}
    if verdict:
        return verdict, {}
    g = torch.Generator().manual_seed(p["seed"] + 3)
    noise = torch.randn(_T.SAMPLE_POINTS, 2, generator=g)
    with torch.no_grad():
        x = sample(net, noise, sampler="heun", steps=EDM_HEUN_STEPS).x
        x0 = mix.sample(20_000, g)
        sigma = draw_sigmas(len(x0), "lognormal", g, p["p_mean"], p["p_std"])
        judge_loss = float(edm_loss(net, x0, sigma, "edm", generator=g))
    hq, counts, _ = _quality(x, mix) if torch.isfinite(x).all() else (0.0, torch.zeros(len(mix.modes)), 0.0)
    reported = float(outputs[0]["losses"][-200:].mean())
    return None, {"hq": hq, "emptiest": float(counts.min()) * len(mix.modes) / _T.SAMPLE_POINTS,
                  "emptiest_count": int(counts.min()), "modes": len(mix.modes), "ratio": reported / judge_loss}


def assess_edm_step(task, outputs: list) -> CheckResult | None:
    """The loss went down; the judge's Heun samples of the trained denoiser reach EDM_HQ_FLOOR on the task's mixture
    with every mode filled; and the losses the step reported are the EDM loss it was asked to minimise."""
    verdict, m = edm_measure(task, outputs)
    if verdict:
        return verdict
    if m["hq"] < EDM_HQ_FLOOR or m["emptiest"] < MODE_SHARE:
        fair = MODE_SHARE * _T.SAMPLE_POINTS / m["modes"]
        return CheckResult("edm_step", FAILED, f"the loss went down, but the trained denoiser's samples (Heun, "
                           f"{EDM_HEUN_STEPS} steps) put {m['hq']:.0%} near one of the {m['modes']} modes (need "
                           f"{EDM_HQ_FLOOR:.0%}), the emptiest mode {m['emptiest_count']} of {_T.SAMPLE_POINTS} (need "
                           f"{fair:.0f}).", "Check the noise levels: each row its own sigma = exp(p_mean + p_std * randn), "
                           "x = x0 + sigma * noise, and regress model(x, sigma) on x0 (the model is the denoiser D).")
    if not EDM_LOSS_RATIO[0] <= m["ratio"] <= EDM_LOSS_RATIO[1]:
        return CheckResult("edm_step", FAILED, f"the samples are good, but the losses your step returned are "
                           f"{m['ratio']:.2f} times EDM's loss of the trained network.",
                           "Weight each row's squared error by lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * "
                           "sigma_data)^2 with model.sigma_data, average over rows and coordinates, return that loss.")
    return None


def _edm_step_with(mistake: str):
    """The reference step with one usual mistake (for the tests and the hints)."""
    def step(model, optimizer, x0, p_mean, p_std):
        if mistake == "uniform sigma":
            sigma = 0.002 + 80 * torch.rand(x0.shape[0])
        else:
            sigma = (p_mean + p_std * torch.randn(x0.shape[0])).exp()
        noise = torch.randn_like(x0)
        sd = model.sigma_data
        weight = {"no weighting": torch.ones_like(sigma), "eps weighting": 1 / sigma**2}.get(
            mistake, (sigma**2 + sd**2) / (sigma * sd) ** 2)
        x = x0 + noise if mistake == "unscaled noise" else x0 + sigma[:, None] * noise
        loss = (weight[:, None] * (model(x, sigma) - x0) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        if mistake != "step":
            optimizer.step()
        return loss.detach()
    return step


def _edm_on_course_data(model, optimizer, x0, p_mean, p_std):
    """A shortcut: trains on the lesson's ring of 8 Gaussians instead of the batch it is given."""
    from ..data import ring_of_gaussians

    return ref_edm_step(model, optimizer, ring_of_gaussians(8, 1.0, 0.08).sample(len(x0)), p_mean, p_std)


register(Exercise(
    "edm_step", 11, ref_edm_step, None,
    "One EDM step: sigma = exp(p_mean + p_std * randn) per row, x = x0 + sigma * noise, the squared error of "
    "model(x, sigma) against x0 weighted by (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 (model.sigma_data), "
    "averaged; then zero_grad, backward, step. Return the loss.",
    mistakes=((_edm_step_with("uniform sigma"), "noise levels"), (_edm_step_with("no weighting"), "lambda(sigma)"),
              (_edm_step_with("eps weighting"), "lambda(sigma)"), (_edm_step_with("unscaled noise"), "noise levels"),
              (_edm_step_with("step"), "optimizer.step()")),
    shortcuts=((_fake_loss_step, "never changed"), (_edm_on_course_data, "samples")),
    trials=1, task=edm_task, assess=assess_edm_step, seconds=120.0, points=2,
    passed_message=f"{_T.TRAIN_STEPS} of your steps trained a preconditioned denoiser whose Heun samples cover a fresh "
                   f"mixture's every mode with at least {EDM_HQ_FLOOR:.0%} near a mode, and your losses are EDM's."))
LIBRARY_EQUIVALENTS.update({
    "edm_step": ("course_lib.edm.edm_loss", "course_lib.edm.draw_sigmas", "course_lib.edm.loss_weight",
                 "course_lib.train.Trainer.train_step", "course_lib.families.edm.EDMFamily.step"),
})
