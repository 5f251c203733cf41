"""The capstone's exercise: a text-to-shapes generator built from the learner's own parts, graded on what it draws.

The learner's function returns their three parts (course_lib.capstone.Parts). In the worker, the course's fixed
procedures run them: the cross-attention on random inputs (compared here with lesson 7's reference), then a fresh
small TextUNet whose cross-attention layers call the learner's function is trained with the learner's step and
sampled with the learner's guided loop on prompts the grader draws. The returned latents are decoded and read here by
the attribute classifier; the returned weights are sampled again here with the judge's own loop, so that samples the
trained network cannot make (images drawn some other way) are caught, and a broken loop is told apart from a broken
training step.
"""
from __future__ import annotations

import torch

from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register
from .lesson7 import _inputs_xattn, ref_cross_attention

CAPSTONE = 99  # the capstone's number among the lessons: after every lesson, whatever their count
STEPS, N_TRAIN, PROMPTS = 1000, 2000, 200  # the check: training steps, training images, prompts judged
# Calibrated with `python -m course_lib bench capstone` (data/bench_capstone.json: the reference on 20 tasks, other
# honest parts on 5, each mistake on 3, the shortcut on 2; one thread, about a minute per check):
BOTH_FLOOR = 0.25  # the share of samples with colour and shape both right (chance 1/24 = 0.042): the reference
# 0.43-0.61, einsum attention with a DPM-Solver++(2M) loop 0.42-0.47; the loop without guidance 0.18-0.24
AHEAD_MAX = 0.15  # the learner's samples may beat the judge's own sampling of the returned weights by this much: honest
# loops are within 0.05 of it; images drawn from the prompts by the course's renderer are 0.4 or more ahead
BEHIND_MAX = 0.15  # and trail it by this much (more: the loop, not the training, loses the prompts): honest loops
# within 0.05; the loop without guidance 0.19 or more behind
# Not caught: a step without caption dropout reaches 0.40-0.50 here (its empty-caption prediction is never trained,
# yet guidance against it still sharpens colour and shape); lesson 6's cond_train_step grades the dropout itself.


def ref_caption_step(model, optimizer, z0, context, mask, null_context, null_mask, alpha_bar):
    """Lesson 2's step on latents with lesson 6's dropout, for captions (Rombach et al. 2022; Ho & Salimans 2022):
    10% of the rows get the empty caption's states and mask, then the eps-prediction MSE and one optimizer step."""
    drop = torch.rand(len(z0)) < 0.1
    context = torch.where(drop[:, None, None], null_context.expand_as(context), context)
    mask = torch.where(drop[:, None], null_mask.expand_as(mask), mask)
    t = torch.randint(len(alpha_bar), (len(z0),))
    noise = torch.randn_like(z0)
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    loss = ((model(ab.sqrt() * z0 + (1 - ab).sqrt() * noise, t, context=context, mask=mask) - noise) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def ref_text_to_shapes():
    """The three parts: lesson 7's cross-attention, the caption step above, lesson 6's guided Euler loop."""
    from .lesson6 import ref_guided_sample_loop

    return {"cross_attention": ref_cross_attention, "train_step": ref_caption_step,
            "sample_loop": ref_guided_sample_loop}


def capstone_task(gen: torch.Generator):
    """Two calls: the learner's attention on lesson 7's random inputs, then training (STEPS steps on N_TRAIN images)
    and sampling PROMPTS one-object test prompts drawn from a secret seed."""
    from ..grading.tasks import Call, Task

    attention = _inputs_xattn(gen)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    prompt_seed = int(torch.randint(0, 2**20, (1,), generator=gen))
    train = {"seed": seed, "steps": STEPS, "n_train": N_TRAIN, "prompt_seed": prompt_seed, "n_prompts": PROMPTS}
    return Task([Call(attention, procedure="capstone_attention"), Call(train, procedure="train_capstone")],
                {"attention": attention, "seed": seed, "prompt_seed": prompt_seed})


def capstone_measure(task, outputs: list) -> tuple[CheckResult | None, dict]:
    """(a verdict on a wrong attention or a broken training run, else None; what the judge measures): `mine`, the
    share of the learner's samples with colour and shape both right; `judge`, the same for the judge's own guided
    Euler loop on the returned weights (torch's attention, the same prompts and noise); colour and shape shares."""
    from .. import capstone as C
    from . import EXERCISES
    from .lesson6 import ref_guided_sample_loop
    from .on_behaviour import _trained_or_verdict

    name, p = "text_to_shapes", task.private
    got, want = outputs[0].get("out") if isinstance(outputs[0], dict) else None, ref_cross_attention(**p["attention"])
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.allclose(
            got.double(), want.double(), rtol=1e-5, atol=1e-6):
        hint = next((h for wrong, h in EXERCISES["cross_attention"].mistakes
                     if isinstance(got, torch.Tensor) and got.shape == want.shape
                     and torch.allclose(got.double(), wrong(**p["attention"]).double(), rtol=1e-5, atol=1e-6)),
                    EXERCISES["cross_attention"].hint)
        return CheckResult(name, FAILED, "your cross_attention does not match lesson 7's on random inputs.", hint), {}
    kit = C.Kit()
    net, verdict = _trained_or_verdict(name, outputs[1:], C.network(None, kit, p["seed"]))
    if net is None or verdict:
        return verdict, {}
    latents = outputs[1].get("latents")
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != (PROMPTS, 4, 8, 8) \
            or not torch.isfinite(latents).all():
        return CheckResult(name, FAILED, f"your sample_loop returned {getattr(latents, 'shape', latents)}; expected "
                           f"finite latents of shape ({PROMPTS}, 4, 8, 8).",
                           "Return x after the last step, at sigma = 0."), {}
    prompts = C.prompts(PROMPTS, p["prompt_seed"])
    mine = C.judge(latents, prompts, kit)
    theirs = C.judge(C.generate(net, ref_guided_sample_loop, prompts, kit, seed=p["seed"]), prompts, kit)
    return None, {"mine": mine["both"], "judge": theirs["both"], "colour": mine["colour"], "shape": mine["shape"],
                  "chance": mine["chance"]}


def assess_text_to_shapes(task, outputs: list) -> CheckResult | None:
    """Lesson 7's attention; a training run that learned; the learner's samples at BOTH_FLOOR or more with colour and
    shape right; and within AHEAD_MAX above / BEHIND_MAX below what the judge's own loop makes of the same weights."""
    verdict, m = capstone_measure(task, outputs)
    if verdict:
        return verdict
    name = "text_to_shapes"
    if m["mine"] > m["judge"] + AHEAD_MAX:
        return CheckResult(name, FAILED, f"{m['mine']:.0%} of your samples follow their prompt, but the network you "
                           f"trained reaches {m['judge']:.0%} when the judge samples it: the samples did not come from "
                           "your network.", "Return what your sample_loop makes with the denoiser it is given.")
    if m["mine"] < m["judge"] - BEHIND_MAX:
        return CheckResult(name, FAILED, f"the network you trained follows its prompts in {m['judge']:.0%} of the "
                           f"judge's samples, but in {m['mine']:.0%} of your loop's.",
                           "Your sample_loop loses the prompts: at each step combine denoise(x, sigma, y) and "
                           "denoise(x, sigma) as D_u + scale (D_c - D_u) and step to the next level.")
    if m["mine"] >= BOTH_FLOOR:
        return None
    return CheckResult(name, FAILED, f"{m['mine']:.0%} of your samples have the colour and the shape their prompt asks "
                       f"for (colour {m['colour']:.0%}, shape {m['shape']:.0%}; chance {m['chance']:.0%}, need "
                       f"{BOTH_FLOOR:.0%}).", "The training step must learn both the captioned and the empty-caption "
                       "prediction: replace a tenth of the rows' context and mask with null_context and null_mask, "
                       "noise z0 at a random t, and minimise the MSE to the noise with model(x_t, t, context=, mask=).")


def _with(**swap):
    """The reference parts with some replaced (the tests' known mistakes and shortcuts)."""
    def parts():
        return {**ref_text_to_shapes(), **swap}
    parts.__name__ = "with_" + "_".join(f.__name__.strip("_") for f in swap.values())
    return parts


def _unmasked_attention(x, context, mask, w_q, w_k, w_v, heads):
    from .lesson7 import _attend

    return _attend(x, context, mask, w_q, w_k, w_v, heads, use_mask=False)


def _unguided_loop(denoise, x, sigmas, y, scale):
    """Euler steps on the conditional prediction alone (no guidance)."""
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = denoise(x, s, y)
        x = d if s_next == 0 else x + (s_next - s) * (x - d) / s
    return x


def _rendered(denoise, x, sigmas, y, scale):
    """A shortcut: ignores the denoiser, finds the prompts in a caller's frame and returns the latents of the scenes they
    describe, drawn by the course's renderer."""
    import inspect

    from .. import capstone as C
    from ..autoencoder import encode
    from ..shapes import POSITIONS, parse_caption, render

    prompts = next(f.frame.f_locals["prompts"] for f in inspect.stack()
                   if isinstance(f.frame.f_locals.get("prompts"), list))
    scenes = [parse_caption(p) for p in prompts]
    for scene in scenes:
        for o in scene["objects"]:
            r, c = POSITIONS[o["position"]]
            o["centre"] = (6 + 10 * r, 6 + 10 * c)
    kit = C.Kit()
    return encode(kit.ae, torch.stack([render(scene) for scene in scenes])) * kit.scale_factor


register(Exercise(
    "text_to_shapes", CAPSTONE, ref_text_to_shapes, None,
    "Return {'cross_attention': ..., 'train_step': ..., 'sample_loop': ...}: your attention of lesson 7, the caption "
    "step (10% empty captions, then lesson 2's step with model(x_t, t, context=, mask=)), your guided loop of lesson 6.",
    mistakes=((_with(cross_attention=_unmasked_attention), "Padded tokens"),
              (_with(sample_loop=_unguided_loop), "loses the prompts")),
    shortcuts=((_with(sample_loop=_rendered), "did not come from your network"),),
    trials=1, task=capstone_task, assess=assess_text_to_shapes, seconds=300.0, points=3,
    passed_message=f"a network with your attention, trained by {STEPS} of your steps and sampled by your loop, draws "
                   f"the colour and shape its prompts ask for on {PROMPTS} fresh prompts well above chance."))
LIBRARY_EQUIVALENTS.update({
    "text_to_shapes": ("course_lib.nets.CrossAttention", "course_lib.nets.cross_attention", "course_lib.text2image",
                       "course_lib.capstone.train", "course_lib.capstone.generate", "course_lib.losses.diffusion_loss",
                       "course_lib.samplers.sample", "course_lib.guidance", "course_lib.train",
                       "course_lib.exercises"),
})
