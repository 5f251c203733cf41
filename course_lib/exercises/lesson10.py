"""Lesson 10: the absorbing (masking) forward sample and MDLM's loss weight, graded on values; a parallel unmasking
sampler, graded on the rows it writes with the exact denoiser of a fresh corpus (course_lib.grading.tasks); the
masked-diffusion training step, graded on the bound its trained network reaches on a fresh Markov chain."""
from __future__ import annotations

import math

import torch

from ..grading import harnesses as _H
from ..grading import tasks as _T
from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register
from .on_behaviour import _fake_loss_step, _trained_or_verdict

UNMASK_VALID = 0.95      # share of rows that are rows of the task's corpus: the reference (one token per step) 1.000
# over 100 tasks; MDLM's binomial reveal counts 0.41-0.49, one shot and the course's own captions 0.000 (random rows:
# two tokens revealed at once from their marginals rarely make a row of the corpus)
UNMASK_DISTINCT = 100    # of 500 samples from a corpus of 300 rows: the reference writes 230-255; greedy (argmax) 1

def ref_absorbing_forward(x0, t, u, mask_id):
    """A draw of the absorbing forward process q(x_t | x_0) with the linear schedule alpha(t) = 1 - t (Austin et al.
    2021; Sahoo et al. 2024): each token becomes [MASK] with probability 1 - alpha(t) = t, decided by its uniform
    number u (masked where u < t); t has one value per row (B,), x0 and u are (B, L)."""
    return torch.where(u < t[:, None], torch.full_like(x0, mask_id), x0)


def _inputs_forward(gen):
    b, n = int(torch.randint(3, 9, (1,), generator=gen)), int(torch.randint(4, 12, (1,), generator=gen))
    k = int(torch.randint(5, 30, (1,), generator=gen))
    return {"x0": torch.randint(0, k - 1, (b, n), generator=gen), "t": torch.rand(b, generator=gen, dtype=torch.float64),
            "u": torch.rand(b, n, generator=gen, dtype=torch.float64), "mask_id": k - 1}


def ref_mdlm_weight(t):
    """MDLM's weight of the masked tokens' cross-entropy (Sahoo et al. 2024, eq. 10), -alpha'(t) / (1 - alpha(t)), for
    the cosine schedule alpha(t) = cos(pi t / 2): (pi / 2) sin(pi t / 2) / (1 - cos(pi t / 2))."""
    return 0.5 * math.pi * torch.sin(0.5 * math.pi * t) / (1 - torch.cos(0.5 * math.pi * t))


def _inputs_weight(gen):
    return {"t": 0.02 + 0.98 * torch.rand(int(torch.randint(3, 20, (1,), generator=gen)), generator=gen,
                                          dtype=torch.float64)}


def ref_unmask_sample(denoise, x, steps, mask_id):
    """Parallel unmasking with the same number of tokens revealed at each step (the linear schedule's expected
    count): before step k of `steps`, reveal all but floor(L (1 - (k + 1) / steps)) of the masked tokens, at random
    positions, each drawn from denoise's probabilities; one denoise call per step."""
    length = x.shape[1]
    for k in range(steps):
        masked = x == mask_id
        keep = math.floor(length * (1 - (k + 1) / steps) + 1e-9)
        probs = denoise(x)
        tokens = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(x.shape)
        score = torch.where(masked, torch.rand(x.shape), torch.full(x.shape, -1.0))
        rank = score.argsort(1, descending=True).argsort(1)
        reveal = masked & (rank < (masked.sum(1, keepdim=True) - keep))
        x = torch.where(reveal, tokens, x)
    return x


def assess_unmask_sample(task, outputs: list) -> CheckResult | None:
    """Lesson 10: the rows hold no [MASK], at least UNMASK_VALID of them are rows of the task's corpus (which only the
    denoiser knows), and at least UNMASK_DISTINCT of them differ."""
    from ..grading.tasks import UNMASK_LENGTH, UNMASK_SAMPLES

    name, x = "unmask_sample", outputs[0]
    want = (UNMASK_SAMPLES, UNMASK_LENGTH)
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != want or x.is_floating_point() or x.is_complex():
        return CheckResult(name, FAILED, f"expected the final token rows, integer ids of shape {want}, got "
                           f"{(tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else type(x).__name__}.",
                           "Return x after the last step.")
    left = int((x == task.calls[0].inputs["mask_id"]).sum())
    if left:
        return CheckResult(name, FAILED, f"{left} [MASK] tokens are left in your samples.",
                           "The last step must reveal every token that is still masked.")
    corpus = {tuple(r) for r in task.private["corpus"].tolist()}
    rows = [tuple(r) for r in x.long().tolist()]
    valid, distinct = sum(r in corpus for r in rows) / len(rows), len(set(rows))
    if valid >= UNMASK_VALID and distinct >= UNMASK_DISTINCT:
        return None
    calls = len(task.calls[0].oracles["denoise"].log)
    return CheckResult(name, FAILED, f"{valid:.0%} of your {len(rows)} samples are rows of the corpus behind the "
                       f"denoiser (need {UNMASK_VALID:.0%}), {distinct} distinct (need {UNMASK_DISTINCT}); {calls} "
                       f"denoise calls for {task.private['steps']} steps.",
                       "Reveal the same number of tokens at every step (with 10 steps and 10 tokens: one), at random "
                       "masked positions, each drawn from denoise's probabilities (torch.multinomial, not argmax), "
                       "and keep the tokens already revealed.")


def _one_shot(denoise, x, steps, mask_id):
    probs = denoise(x)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(x.shape)


def _greedy(denoise, x, steps, mask_id):
    for k in range(steps):
        masked = x == mask_id
        pos = masked.float().argmax(1)
        tok = denoise(x).argmax(-1).gather(1, pos[:, None]).squeeze(1)
        x = x.clone()
        x[torch.arange(len(x)), pos] = torch.where(masked.any(1), tok, x[torch.arange(len(x)), pos])
    return x


def _no_call(denoise, x, steps, mask_id):
    """A shortcut: never calls the denoiser; random words."""
    return torch.randint(1, mask_id, x.shape, generator=torch.Generator().manual_seed(0))


def _course_captions(denoise, x, steps, mask_id):
    """A shortcut: valid captions of the course's own grammar, never calling the denoiser."""
    from ..captions import caption_corpus

    return caption_corpus(len(x), "train", seed=0)[0][:, : x.shape[1]]


def _over_budget(denoise, x, steps, mask_id):
    for _ in range(steps + 1):
        denoise(x)
    return ref_unmask_sample(denoise, x, steps, mask_id)


def _binomial(denoise, x, steps, mask_id):  # MDLM's ancestral counts: right in expectation, too many at once
    for k in range(steps):
        t, s = 1 - k / steps, 1 - (k + 1) / steps
        probs = denoise(x)
        tokens = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(x.shape)
        reveal = (x == mask_id) & (torch.rand(x.shape) < (t - s) / t)
        x = torch.where(reveal, tokens, x)
    return x


register(Exercise(
    "absorbing_forward", 10, ref_absorbing_forward, _inputs_forward,
    "Mask where u < t[:, None] (t is one value per row, so give it a column axis): "
    "torch.where(u < t[:, None], mask_id, x0), keeping x0's integer dtype.",
    mistakes=((lambda x0, t, u, mask_id: torch.where(u < 1 - t[:, None], torch.full_like(x0, mask_id), x0),
               "With alpha(t) = 1 - t the share still clean is 1 - t, so a token is masked with probability t."),
              (lambda x0, t, u, mask_id: torch.where(u < t[:, None], torch.zeros_like(x0), x0),
               "A masked token becomes mask_id (the absorbing state), not 0 (0 is padding, a real token)."),
              (lambda x0, t, u, mask_id: torch.where(u < t[:, None], x0, torch.full_like(x0, mask_id)),
               "Keep the token where u >= t and mask it where u < t (the other way round masks a share 1 - t).")),
    rtol=0, atol=0))
register(Exercise(
    "mdlm_weight", 10, ref_mdlm_weight, _inputs_weight,
    "With alpha(t) = cos(pi t / 2), alpha'(t) = -(pi / 2) sin(pi t / 2); return -alpha'(t) / (1 - alpha(t)).",
    mistakes=((lambda t: 1 / t, "1 / t is the linear schedule's weight; differentiate alpha(t) = cos(pi t / 2)."),
              (lambda t: -0.5 * math.pi * torch.sin(0.5 * math.pi * t) / (1 - torch.cos(0.5 * math.pi * t)),
               "alpha decreases, so alpha' < 0 and the weight -alpha' / (1 - alpha) is positive."),
              (lambda t: 0.5 * math.pi * torch.sin(0.5 * math.pi * t) / torch.cos(0.5 * math.pi * t),
               "Divide by 1 - alpha(t), the probability that a token is masked, not by alpha(t).")),
    rtol=1e-6, atol=1e-9))
register(Exercise(
    "unmask_sample", 10, ref_unmask_sample, None,
    "For each of the `steps` steps: call denoise(x) once, draw a token for every position from its probabilities, "
    "and reveal (copy into x) the drawn tokens at randomly chosen masked positions, as many as leave "
    "floor(L (1 - (k + 1) / steps)) still masked; return x (no [MASK] left).",
    mistakes=((_one_shot, "Reveal the same number"), (_greedy, "torch.multinomial, not argmax"),
              (_binomial, "Reveal the same number")),
    shortcuts=((_no_call, "rows of the corpus"), (_course_captions, "rows of the corpus"), (_greedy, "distinct"),
               (_over_budget, "more than the budget")),
    trials=2, task=_T.unmasking_task, assess=assess_unmask_sample, seconds=60.0, points=2,
    passed_message=f"with one denoiser call per step, at least {UNMASK_VALID:.0%} of your samples of two fresh corpora "
                   f"are rows of the corpus, at least {UNMASK_DISTINCT} of them distinct."))
LIBRARY_EQUIVALENTS.update({
    "absorbing_forward": ("course_lib.discrete.mask_tokens", "course_lib.discrete.absorbing_transition",
                          "course_lib.discrete.absorbing_marginal"),
    "mdlm_weight": ("course_lib.discrete.mdlm_weight", "course_lib.discrete.alpha_rate"),
    "unmask_sample": ("course_lib.text_models.sample_masked", "course_lib.text_models.generate"),
})


# ---- lesson 10: the masked-diffusion training step -------------------------------------------------------------------

# Calibrated with `python -m course_lib bench exercises` (data/bench_exercises.json: 20 tasks for the reference, 10 for
# each honest variant, 5 for each mistake; one thread)
MASKED_GAP = 0.2  # nats per token above the chain's exact entropy that the trained network's bound may reach: the
# reference 0.02-0.12; trained on one constant row 16+
LOSS_AGREEMENT = (0.8, 1.25)  # the learner's reported loss over the last steps / the judge's bound of the same network:
# the reference 0.94-1.00; without the 1 / t weight 0.55-0.62; per row instead of per token 12-14 (the row's length)
BOUND_ROWS, BOUND_TIMES = 2000, 16  # the judge's bound: fresh rows, stratified times per row


def ref_masked_step(model, optimizer, x0, mask_id):
    """One step on MDLM's negative ELBO (Sahoo et al. 2024, eq. 10, linear schedule alpha(t) = 1 - t): t ~ U(0, 1)
    per row, each token masked with probability t, the cross-entropy of the masked tokens weighted by 1 / t; in nats
    per token (the sum over a row divided by its length, averaged over rows)."""
    b, length = x0.shape
    t = torch.rand(b, 1).clamp_min(1e-3)
    xt = torch.where(torch.rand(b, length) < t, torch.full_like(x0, mask_id), x0)
    ce = torch.nn.functional.cross_entropy(model(xt).transpose(1, 2), x0, reduction="none")
    loss = ((xt == mask_id) * ce / t).sum(1).mean() / length
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def masked_measure(task, outputs: list) -> tuple[CheckResult | None, dict]:
    """The training run's verdict if it went wrong (else None), and what the judge measures: the trained network's
    bound on fresh rows (text_models.masked_bound), the chain's exact entropy (both per token), their gap, and the reported loss's ratio to the
    bound."""
    seed, chain, mask_id = task.private["seed"], task.private["chain"], task.private["mask_id"]
    net, verdict = _trained_or_verdict("masked_step", outputs, _H.token_net(seed, chain.length, mask_id))
    if verdict:
        return verdict, {}
    rows = chain.sample(BOUND_ROWS, torch.Generator().manual_seed(seed + 5))
    from ..text_models import masked_bound

    with torch.no_grad():
        bound = float(masked_bound(net, rows, BOUND_TIMES, seed=seed + 6, mask_id=mask_id).mean()) / chain.length
    exact = chain.entropy() / chain.length
    reported = float(outputs[0]["losses"][-200:].mean())
    return None, {"bound": bound, "exact": exact, "gap": bound - exact, "reported": reported,
                  "ratio": reported / bound, "length": chain.length}


def assess_masked_step(task, outputs: list) -> CheckResult | None:
    """Lesson 10: the loss went down; the trained network's bound on fresh rows of the task's Markov chain is within
    MASKED_GAP nats per token of the chain's exact entropy; and the loss the step reported over its last 200 steps
    agrees with that bound (it is the negative ELBO in nats per token, not another number)."""
    verdict, m = masked_measure(task, outputs)
    if verdict:
        return verdict
    ratio = m["ratio"]
    if m["gap"] <= MASKED_GAP and LOSS_AGREEMENT[0] <= ratio <= LOSS_AGREEMENT[1]:
        return None
    what = (f"the trained network's bound on fresh rows is {m['bound']:.3f} nats per token, the data's exact entropy "
            f"{m['exact']:.3f} (accepted: within {MASKED_GAP:g}); the loss your step reported over its last 200 steps "
            f"averages {m['reported']:.3g}, {ratio:.2f} times that bound (accepted: {LOSS_AGREEMENT[0]:g} to "
            f"{LOSS_AGREEMENT[1]:g})")
    if abs(ratio / m["length"] - 1) < 0.2:
        hint = "Report the loss per token: the row's weighted sum divided by the row's length, averaged over rows."
    elif ratio < LOSS_AGREEMENT[0]:
        hint = ("Weight each masked token's cross-entropy by 1 / t (MDLM's -alpha'(t) / (1 - alpha(t)) for the linear "
                "schedule): without it the number your step minimises and returns is not the bound.")
    else:
        hint = ("Mask each token with probability t (masked where a uniform number is below t), take the "
                "cross-entropy of model(x_t) against x0 at the masked positions only, weight it by 1 / t, and return "
                "the mean per token.")
    return CheckResult("masked_step", FAILED, f"{what}.", hint)


def _masked_step_with(mistake: str):
    """The reference step with one usual mistake (for the tests and the hints)."""
    def step(model, optimizer, x0, mask_id):
        b, length = x0.shape
        t = torch.rand(b, 1).clamp_min(1e-3)
        masked = torch.rand(b, length) < ((1 - t) if mistake == "keep t" else t)
        xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
        ce = torch.nn.functional.cross_entropy(model(xt).transpose(1, 2), x0, reduction="none")
        weighted = (xt == mask_id) * ce / (1 if mistake == "weight" else t)
        loss = weighted.sum(1).mean() / (1 if mistake == "per row" else length)
        optimizer.zero_grad()
        loss.backward()
        if mistake != "step":
            optimizer.step()
        return loss.detach()
    return step


def _masked_on_one_row(model, optimizer, x0, mask_id):
    """A shortcut: trains on one constant row (token 0 everywhere) instead of the batch it is given."""
    return ref_masked_step(model, optimizer, torch.zeros_like(x0), mask_id)


register(Exercise(
    "masked_step", 10, ref_masked_step, None,
    "One masked-diffusion step: one t ~ U(0, 1) per row, mask each token with probability t, the cross-entropy of "
    "model(x_t) against x0 at the masked positions weighted by 1 / t, summed over the row and divided by its length, "
    "averaged over rows; then zero_grad, backward, step. Return the loss.",
    mistakes=((_masked_step_with("weight"), "1 / t"), (_masked_step_with("per row"), "per token"),
              (_masked_step_with("step"), "optimizer.step()")),
    shortcuts=((_fake_loss_step, "never changed"), (_masked_on_one_row, "exact entropy")),
    trials=1, task=_T.masked_training_task, assess=assess_masked_step, seconds=120.0,
    passed_message=f"{_T.TRAIN_STEPS} of your steps trained a network whose bound on fresh rows of a random Markov "
                   f"chain is within {MASKED_GAP:g} nats per token of the chain's exact entropy, and your loss is that "
                   f"bound."))
LIBRARY_EQUIVALENTS.update({
    "masked_step": ("course_lib.text_models.masked_diffusion_loss", "course_lib.discrete.mdlm_loss",
                    "course_lib.discrete.mask_tokens", "course_lib.train.Trainer.train_step"),
})
