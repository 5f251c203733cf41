"""Lesson 7's shipped models and how each is trained: `python -m course_lib train --preset NAME` runs these
(the classifier, autoencoder and mini-CLIP first: the two diffusion models use the shipped ones); and lesson 13's
judge of the new shape, on the shipped classifier."""
from __future__ import annotations

PRESETS = {
    "shapes_classifier": dict(steps=2000),
    "shapes_ae": dict(steps=2500, batch_size=32),
    "shapes_clip": dict(steps=1500, batch_size=256),
    "shapes_ldm": dict(space="latent", steps=3500, batch_size=64, eval_every=500),
    "shapes_pixel": dict(space="pixel", steps=700, batch_size=32, eval_every=175),
    # lesson 8: a DiT on the same latents with shapes_ldm's budget (steps, batch, learning rate, EMA, data)
    "shapes_dit": dict(space="latent", net="dit", steps=3500, batch_size=64, eval_every=500),
    # ... and for twice the steps: does the transformer catch up when it is given longer? (lesson 8 plots both curves)
    "shapes_dit_long": dict(space="latent", net="dit", steps=7000, batch_size=64, eval_every=1000),
    # lesson 13: the judge of the new shape (a head on shapes_classifier's frozen features, trained on rendered images)
    "shapes_star_judge": dict(steps=1500),
}


def train_preset(name: str, steps: int | None = None, progress: bool = True):
    """Train a lesson-7 preset; returns (model, card, export(path, card))."""
    if name not in PRESETS:
        raise ValueError(f"unknown lesson-7 preset {name!r}; choose one of {list(PRESETS)}")
    kwargs = {**PRESETS[name], **({"steps": steps} if steps else {})}
    if name == "shapes_classifier":
        from .attributes import export, train_attribute_classifier
        model, card = train_attribute_classifier(progress=progress, **kwargs)
    elif name == "shapes_ae":
        from .attributes import export
        from .autoencoder import train_autoencoder
        model, card = train_autoencoder(progress=progress, **kwargs)
        card["batch_size"] = kwargs["batch_size"]
    elif name == "shapes_star_judge":
        from .concepts import export_judge, train_concept_judge
        model, card = train_concept_judge(progress=progress, **kwargs)
        return model, card, lambda path, c: export_judge(model, path, c)
    elif name == "shapes_clip":
        from .attributes import export
        from .clip import train_clip
        model, card = train_clip(progress=progress, **kwargs)
    else:
        from .text2image import export as export_t2i
        from .text2image import train_text_to_image
        model, card = train_text_to_image(progress=progress, **kwargs)
        return model, card, lambda path, c: export_t2i(model, path, c, name)
    return model, card, lambda path, c: export(model, path, c, {"preset": name})
