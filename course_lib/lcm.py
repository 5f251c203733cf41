"""Lesson 12's latent consistency model (Luo et al. 2023) of lesson 7's text-to-image model, judged as lesson 7 judges
its teacher: prompt adherence per sampling budget (the attribute classifier on one-object test prompts) and attribute
binding (two-object prompts), on the same prompts and noise for the student and the teacher."""
from __future__ import annotations

import time

import torch

NFES = (1, 2, 4)          # the student's budgets: consistency-sampler calls (one network call of batch B each)
TEACHER_NFES = (1, 2, 4, 20)  # the guided teacher's: DPM-Solver++(2M) steps, each one network call of batch 2B
KEYS = ("shape", "colour", "position", "size", "all")
BINDING_KEYS = ("all", "binding", "present", "swapped", "misbound")


def load_lcm(name_or_path: str = "shapes_lcm"):
    """The shipped latent consistency model (or a file written by `python -m course_lib train --preset shapes_lcm`)
    as a TextToImage: `generate(prompts, nfe=1 | 2 | 4)` samples it with the consistency sampler, no guidance pass."""
    from .text2image import load_text_to_image

    model = load_text_to_image(name_or_path)
    if not model.few_step:
        raise ValueError(f"{name_or_path} is not a latent consistency model (use text2image.load_text_to_image)")
    return model


def prompt_adherence(model, nfe: int, n: int = 500, seed: int = 0, scale: float | None = None,
                     sampler: str | None = None, clf=None) -> dict:
    """Generate for n one-object and n two-object test prompts (noise seed `seed`) at `nfe` sampler calls; the
    attribute judge's accuracy per attribute and for all at once (one object), and 'all' and 'binding' with what went
    wrong (two objects: `attributes.binding_breakdown`); network_evals counts the network's image-calls per image."""
    from .attributes import adherence, binding_breakdown, load_attribute_classifier
    from .text2image import DEFAULT_SCALE, single_object_prompts, two_object_prompts

    clf = clf or load_attribute_classifier()
    start = time.perf_counter()
    one, two = single_object_prompts(n), two_object_prompts(n)
    images = model.generate(one, scale=scale, nfe=nfe, sampler=sampler, seed=seed)
    acc = adherence(clf, images, one)
    out = {k: round(acc[k], 4) for k in KEYS}
    images = model.generate(two, scale=scale, nfe=nfe, sampler=sampler, seed=seed + 1)
    acc2 = {**adherence(clf, images, two), **binding_breakdown(clf, images, two)}
    out.update({f"two_{k}": round(acc2[k], 4) for k in BINDING_KEYS})
    w = 1.0 if model.few_step else (model.card.get("best_scale", DEFAULT_SCALE) if scale is None else scale)
    out["network_evals"] = nfe * (1 if w == 1.0 else 2)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


@torch.no_grad()
def adherence_by_budget(model, nfes=None, n: int = 500, seed: int = 0, scale: float | None = None) -> dict:
    """{f'nfe_{k}': prompt_adherence(...)} at each budget: the student's NFES, or the teacher's TEACHER_NFES with
    DPM-Solver++(2M) at its card's guidance scale (or `scale`)."""
    from .attributes import load_attribute_classifier

    clf = load_attribute_classifier()
    nfes = nfes or (NFES if model.few_step else TEACHER_NFES)
    return {f"nfe_{k}": prompt_adherence(model, k, n, seed, scale, clf=clf) for k in nfes}


def from_trainer(trainer):
    """A training run's EMA student (family latent_consistency) as a TextToImage, with the shipped text encoder and
    autoencoder it was trained with; its card names the guidance folded in and the latents' scale factor."""
    from .autoencoder import load_autoencoder
    from .text2image import TextToImage

    if trainer.family != "latent_consistency":
        raise ValueError(f"from_trainer needs a latent_consistency run, got family {trainer.family!r}")
    ae, scale = load_autoencoder()
    card = {"guidance": trainer.config.guidance, "teacher": trainer.config.teacher, "scale_factor": scale}
    return TextToImage(trainer.ema, None, trainer.text_encoder, ae.to(trainer.device), scale, card)
