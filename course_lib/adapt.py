"""Teaching a trained text-to-image model a new concept (lesson 13): LoRA (Hu et al. 2022) on its attention layers,
DreamBooth's prior preservation (Ruiz et al. 2023, eq. 2) and textual inversion (Gal et al. 2023, eq. 2), all on
lesson 7's latent model and the new shape of course_lib.concepts, with the loss the model was trained with.

One function, `adapt`, covers the three: which parameters train (the LoRA matrices, or only the new word's row of the
token table) and whether the prior loss is on are its arguments, so that the lesson compares them like for like
(same images, steps, batch and noise).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch

from . import concepts
from .lora import ATTENTION, ATTENTION_AND_CONV
from .losses import diffusion_loss

METHODS = ("lora", "textual_inversion", "full")
TARGETS = {"attention": ATTENTION, "attention_conv": ATTENTION_AND_CONV}  # the layers LoRA adapts (course_lib.lora)


@dataclass
class AdaptConfig:
    """What an adaptation run does; the defaults are the lesson's recommended LoRA run."""

    method: str = "lora"            # 'lora': adapters on the layers `targets` names; 'textual_inversion': the new
                                    # word's embedding only; 'full': every weight of the UNet (DreamBooth's paper)
    rank: int = 4                   # LoRA rank r
    targets: str = "attention_conv"  # LoRA on 'attention' projections only, or 'attention_conv': and the residual
                                    # blocks' 3x3 convs (what the lesson measures as the better choice)
    alpha: float | None = None      # LoRA alpha (scale alpha / r); None: r
    images: int = 200               # concept images (from the 'adapt' generator); DreamBooth's few: 5
    steps: int = 800
    batch_size: int = 16            # concept rows per step (and as many prior rows when prior_weight > 0)
    lr: float = 3e-3
    prior_weight: float = 1.0       # DreamBooth's lambda; 0 turns prior preservation off
    prior_images: int = 200         # the frozen model's own images of lesson 7's prompts, made once before training
    caption_dropout: float = 0.1    # as in lesson 7's training, so that guidance keeps working for the new word
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("rank", "images", "steps", "batch_size", "prior_images"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be a number > 0, got {self.lr!r}")
        if isinstance(self.prior_weight, bool) or not isinstance(self.prior_weight, (int, float)) or \
                not self.prior_weight >= 0:
            raise ValueError(f"prior_weight must be a number >= 0 (0: no prior preservation), got {self.prior_weight!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {tuple(TARGETS)}, got {self.targets!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"need 0 <= caption_dropout < 1, got {self.caption_dropout!r}")


def concept_model(base, encoder=None):
    """lesson 7's model able to read the new word: a copy of its UNet, the text encoder with the word's row added
    (concepts.add_word) unless `encoder` is given, and concepts.tokenize as its tokenizer."""
    from .text2image import TextToImage

    encoder = encoder if encoder is not None else concepts.add_word(base.text_encoder)
    return TextToImage(copy.deepcopy(base.unet).eval(), base.schedule, encoder, base.autoencoder, base.scale_factor,
                       dict(base.card), tokenizer=concepts.tokenize)


def prior_data(base, n: int, seed: int = 0, progress: bool = False):
    """DreamBooth's class data: the frozen model's own latents for n of lesson 7's one- and two-object training
    prompts (guided at its card's scale), and those prompts: what the prior loss keeps the model able to do."""
    from .text2image import single_object_prompts, two_object_prompts

    prompts = single_object_prompts(n - n // 2, "train", seed + 31) + two_object_prompts(n // 2, "train", seed + 37)
    latents = base.generate(prompts, seed=seed + 41, return_latents=True, progress=progress)
    return latents, prompts


def adapt(base, config: AdaptConfig | None = None, progress: bool = True, prior=None, callback=None, every: int = 0,
          **overrides):
    """Adapt a copy of `base` (a latent TextToImage, lesson 7's shapes_ldm) to the new concept; returns (the adapted
    model, its card). `prior` = (latents, prompts) reuses prior_data's (it is the costly part) across runs;
    `callback(step, model, seconds)` runs every `every` steps on the model being adapted (a learning curve)."""
    from .autoencoder import encode
    from .fit import fit
    from .lora import add_lora, parameter_counts

    c = config or AdaptConfig()
    c = AdaptConfig(**{**asdict(c), **overrides}) if overrides else c
    if base.space != "latent" or base.schedule is None:
        raise ValueError("adapt takes a latent diffusion model (load_text_to_image('shapes_ldm'))")
    model = concept_model(base)
    images, captions = concepts.make_concept(c.images, "adapt", c.seed)
    with torch.no_grad():
        x_new = encode(base.autoencoder, images) * base.scale_factor
    tok_new = concepts.tokenize(captions)
    if c.prior_weight > 0:
        x_prior, prior_prompts = prior if prior is not None else prior_data(base, c.prior_images, c.seed)
        tok_prior = concepts.tokenize(list(prior_prompts))
    torch.manual_seed(c.seed)
    if c.method == "lora":
        add_lora(model.unet, c.rank, c.alpha, targets=TARGETS[c.targets], seed=c.seed)
        params = [p for p in model.unet.parameters() if p.requires_grad]
        trainable = parameter_counts(model.unet)["lora"]
    elif c.method == "full":
        params = [p for p in model.unet.parameters()]
        for p in params:
            p.requires_grad_(True)
        trainable = sum(p.numel() for p in params)
    else:  # textual inversion: only the new word's row of the token table learns
        model.unet.requires_grad_(False)
        table = model.text_encoder.tokens.weight
        table.requires_grad_(True)
        keep = torch.zeros_like(table)
        keep[concepts.WORD_INDEX] = 1
        table.register_hook(lambda grad: grad * keep)
        params, trainable = [table], table.shape[1]
    encoder, unet, schedule = model.text_encoder, model.unet, model.schedule
    g = torch.Generator().manual_seed(c.seed)

    def loss_on(x, tok):
        tok = tok.clone()
        tok[torch.rand(len(tok), generator=g) < c.caption_dropout] = 0
        with torch.set_grad_enabled(c.method == "textual_inversion"):
            ctx, mask = encoder(tok)
        return diffusion_loss(unet, x, schedule, unet.prediction, generator=g, context=ctx, mask=mask)

    def loss_fn(step):
        idx = torch.randint(len(x_new), (c.batch_size,), generator=g)
        loss = loss_on(x_new[idx], tok_new[idx])
        if c.prior_weight > 0:
            j = torch.randint(len(x_prior), (c.batch_size,), generator=g)
            prior_loss = loss_on(x_prior[j], tok_prior[j])
            return loss + c.prior_weight * prior_loss, {"concept": loss.item(), "prior": prior_loss.item()}
        return loss

    # no weight decay: it would pull the new word's row (and the adapters) towards zero, not towards where they start
    _, log = fit(encoder if c.method == "textual_inversion" else unet, loss_fn, c.steps, lr=c.lr, warmup=min(50, c.steps // 10),
                 weight_decay=0.0, desc=f"adapt ({c.method})", progress=progress, params=params,
                 callback=(lambda step, _, seconds: callback(step, model, seconds)) if callback else None, every=every)
    unet.eval().requires_grad_(False)
    encoder.eval().requires_grad_(False)
    base_params = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
    card = {**asdict(c), "trainable_parameters": int(trainable), "base_parameters": int(base_params),
            "trainable_share": round(trainable / base_params, 5), "train_seconds": round(log["seconds"], 1),
            "final_loss": round(sum(log["losses"][-50:]) / len(log["losses"][-50:]), 5)}
    model.card = {**base.card, "adapted": card}
    return model, card


def evaluate(model, judge, classifier, n_concept: int = 200, n_old: int = 200, seed: int = 0, nfe: int = 20) -> dict:
    """What adapting did, on fixed prompts and noise: 'fidelity' (the concept judge reads the new shape on test prompts
    naming it) and 'concept_all' (every attribute of those prompts right), and lesson 7's adherence on its own one- and
    two-object test prompts ('old_all', 'old_binding': what the model could do before, kept or lost)."""
    from .attributes import adherence
    from .text2image import single_object_prompts, two_object_prompts

    prompts = concepts.concept_prompts(n_concept, seed)
    judged = concepts.concept_adherence(judge, model.generate(prompts, seed=seed, nfe=nfe), prompts)
    one, two = single_object_prompts(n_old, "test", seed), two_object_prompts(n_old, "test", seed)
    images = model.generate(one + two, seed=seed + 1, nfe=nfe)
    return {"fidelity": judged["shape"], "concept_all": judged["all"],
            "old_all": adherence(classifier, images[:n_old], one)["all"],
            "old_binding": adherence(classifier, images[n_old:], two)["binding"], "concept_prompts": n_concept,
            "old_prompts": n_old}
