"""A latent consistency model as a family of the training loop (lesson 12; Luo et al. 2023, Algorithm 1): consistency
distillation of lesson 7's text-to-image model in its autoencoder's latent space, the teacher's ODE step taken with
classifier-free guidance at a fixed scale w, so that the student's one call gives what the guided teacher's many pairs
of calls give (guidance folded into the student)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..consistency import consistency_distillation_loss, karras_grid
from ..guidance import caption_guided
from .fewstep import ConsistencyFamily, ConsistencyOptions, _number

LATENT_SIGMA_MAX = 20.0  # where lesson 7's sampling starts (text2image.SIGMA_MAX): pure noise to 0.13% in std


def load_text_teacher(name: str):
    """(the text-to-image model, its network as D(x, sigma, context=, mask=)) for a shipped name or a saved file of a
    latent text-to-image model (lesson 7 or 8)."""
    from ..nets import EDMPrecond
    from ..text2image import load_text_to_image

    model = load_text_to_image(name)
    if model.space != "latent":
        raise ValueError(f"teacher {name!r} is a {model.space}-space model; a latent consistency model distils a "
                         "latent one (shapes_ldm, shapes_dit)")
    net = EDMPrecond.from_eps_model(model.unet, model.schedule.name, model.schedule.T)
    return model, net.eval().requires_grad_(False)


@dataclass
class LatentConsistencyOptions(ConsistencyOptions):
    teacher: str | None = "shapes_ldm"  # a latent text-to-image model (required)
    guidance: float = 3.0               # w of the teacher's guided ODE step (lesson 7's recommended scale)
    sigma_max: float = LATENT_SIGMA_MAX

    def __post_init__(self):
        super().__post_init__()
        if self.teacher is None or self.init is not None:
            raise ValueError("a latent consistency model distils a teacher: give teacher= (e.g. 'shapes_ldm'), no init")
        _number("guidance", self.guidance, low=-1e-12)


def guided(teacher, scale: float, null_context: torch.Tensor, null_mask: torch.Tensor):
    """The teacher's guided denoiser D_w(x, sigma, c) for a network that takes one sigma per row
    (guidance.caption_guided; text2image.caption_guidance is the same for a sampler's Denoiser)."""

    def fn(x, sigma, context, mask):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        return caption_guided(teacher, x, sigma, context, mask, null_context, null_mask, scale)

    return fn


class LatentConsistencyFamily(ConsistencyFamily):
    """Consistency distillation (the parent's Algorithm 2) on (latent, caption) pairs: the student and its EMA target
    see the caption, the teacher's Heun step is guided at w; the student starts from the teacher's weights."""

    name, Options, loss_names = "latent_consistency", LatentConsistencyOptions, ("loss",)

    def check(self, config) -> None:
        if config.data != "shapes_latents":
            raise ValueError(f"a latent consistency model trains on data='shapes_latents' (lesson 7's latents and "
                             f"captions), got {config.data!r}")

    def networks(self, config, shape, num_classes):
        o = config.options
        denoiser = load_text_teacher(o.teacher)[1].config
        net = {"kind": "consistency", "denoiser": denoiser, "sigma_data": o.sigma_data, "sigma_min": o.sigma_min,
               "sigma_max": o.sigma_max}
        return {"model": net, "target": dict(net)}

    def setup(self, trainer) -> None:
        o = trainer.config.options
        model, net = load_text_teacher(o.teacher)
        trainer.schedule = None
        trainer.teacher = trainer.start = net.to(trainer.device)
        trainer.text_encoder = model.text_encoder.to(trainer.device).eval().requires_grad_(False)
        null_c, null_m = model.condition("")
        trainer.guided_teacher = guided(trainer.teacher, o.guidance, null_c.to(trainer.device),
                                        null_m.to(trainer.device))
        trainer.grid = karras_grid(o.intervals, o.sigma_min, o.sigma_max)

    def step(self, trainer) -> list:
        o = trainer.config.options
        x0, tokens = trainer.batch()
        with torch.no_grad():
            context, mask = trainer.text_encoder(tokens.to(trainer.device))
        g, n = trainer.generator, x0.shape[0]
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        i = torch.randint(o.intervals, (n,), generator=g)
        hi, lo = trainer.grid[i + 1].float().to(x0.device), trainer.grid[i].float().to(x0.device)
        loss = consistency_distillation_loss(trainer.model, trainer.nets["target"], trainer.guided_teacher, x0, noise,
                                             hi, lo, o.solver, o.distance, context=context, mask=mask)
        trainer.update("model", loss)
        self.update_target(trainer)
        return [loss]

