"""The tasks of lesson 7's exercises graded on behaviour: a text-conditioned UNet with random weights, images of random
rectangles for the KL autoencoder, and paired 'images' and two-word 'captions' of random concepts for the contrastive
loss. Like course_lib.grading.tasks, each is drawn from a generator (a secret seed in the grader), from families the
course's own data does not produce; what the verdict needs stays in the task's private part."""
from __future__ import annotations

import math

import torch

from .oracles import Oracle, OracleRef
from .tasks import Call, Task, _randint, _uniform

TEXT_BATCH = 6
AE_SIZE, AE_POOL, AE_TEST = 8, 4096, 1000  # the autoencoder exercise: 3 x 8 x 8 images, sent and held out
AE_STEPS, AE_BATCH = 2000, 64
CLIP_DIM = 24  # the contrastive exercise: the 'images' are vectors of this size
CLIP_STEPS, CLIP_BATCH, CLIP_PER_CONCEPT = 400, 32, 40


def text_network(gen: torch.Generator):
    """A small text-conditioned UNet and text encoder with random weights drawn from `gen` (no zero layers)."""
    from ..nets import TextEncoder, TextUNet
    from ..shapes import VOCAB

    state = torch.random.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # the modules' own initialisation
    try:
        unet = TextUNet(in_channels=4, base=16, mults=[1, 2], heads=2, groups=4, context_dim=16).eval()
        text = TextEncoder(len(VOCAB), dim=16, depth=1, heads=2).eval()
    finally:
        torch.random.set_rng_state(state)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return unet, text


def text_guidance_task(gen: torch.Generator) -> Task:
    """Lesson 7: text_guided_eps(model, x, t, context, mask, null_context, null_mask, scale) on a random text UNet;
    the model may see 2B rows in all (one conditional and one empty-caption prediction per image)."""
    from ..shapes import COLOURS, SHAPES, tokenize

    unet, text = text_network(gen)
    colours = list(COLOURS)
    prompts = [f"a {colours[_randint(gen, 0, len(colours) - 1)]} {SHAPES[_randint(gen, 0, len(SHAPES) - 1)]}"
               for _ in range(TEXT_BATCH)]
    with torch.no_grad():
        tokens = tokenize(prompts)
        context, mask = text(tokens)
        null_context, null_mask = text(torch.zeros(1, tokens.shape[1], dtype=torch.long))
    inputs = {"x": torch.randn(TEXT_BATCH, 4, 8, 8, generator=gen), "t": torch.randint(1, 1000, (TEXT_BATCH,), generator=gen),
              "context": context, "mask": mask, "null_context": null_context, "null_mask": null_mask,
              "scale": round(_uniform(gen, 1.5, 7.5), 3)}
    length, width = context.shape[1:]

    def check(x, t, context=None, mask=None):
        if context is None or mask is None:
            raise ValueError("call model(x, t, context=..., mask=...): the UNet needs the caption's states and mask")
        if not (isinstance(x, torch.Tensor) and x.ndim == 4 and tuple(x.shape[1:]) == (4, 8, 8)
                and x.is_floating_point() and torch.isfinite(x).all()):
            raise ValueError(f"x must be finite latents of shape (n, 4, 8, 8), got {getattr(x, 'shape', x)}")
        n = x.shape[0]
        t = torch.as_tensor(t)
        if t.shape != (n,) or t.is_floating_point():
            raise ValueError(f"t must hold {n} integer timesteps")
        if not (isinstance(context, torch.Tensor) and tuple(context.shape) == (n, length, width)
                and context.is_floating_point() and torch.isfinite(context).all()):
            raise ValueError(f"context must be caption states of shape ({n}, {length}, {width})")
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != (n, length):
            raise ValueError(f"mask must have shape ({n}, {length})")
        return x.float(), t.long(), context.float(), mask.bool()

    oracle = Oracle("model", lambda x, t, c, m: unet(x, t, context=c, mask=m), check, 2 * TEXT_BATCH,
                    cost=lambda a: a[0].shape[0],
                    budget_text=f"{2 * TEXT_BATCH} rows: one conditional and one empty-caption prediction per image")
    call = Call({"model": OracleRef("model"), **{k: v.clone() if isinstance(v, torch.Tensor) else v
                                                 for k, v in inputs.items()}}, {"model": oracle})

    def model(x, t, context=None, mask=None):
        with torch.no_grad():
            return unet(x, t, context=context, mask=mask)
    return Task([call], {"inputs": inputs, "model": model})


def rectangle_images(n: int, gen: torch.Generator, size: int = AE_SIZE) -> torch.Tensor:
    """n RGB images (n, 3, size, size) in [-1, 1]: a background of one random colour under 1-3 axis-aligned rectangles
    of random colours, places and sizes (2 to size / 2 pixels a side), later ones on top."""
    x = (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1).expand(n, 3, size, size).clone()
    pixels = torch.arange(size)
    count = torch.randint(1, 4, (n,), generator=gen)
    for k in range(3):
        colour = torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1
        corner = torch.randint(0, size - 1, (n, 2), generator=gen)
        extent = torch.randint(2, size // 2 + 1, (n, 2), generator=gen)
        rows = (pixels >= corner[:, :1]) & (pixels < corner[:, :1] + extent[:, :1])
        cols = (pixels >= corner[:, 1:]) & (pixels < corner[:, 1:] + extent[:, 1:])
        inside = (rows[:, :, None] & cols[:, None, :])[:, None] & (k < count)[:, None, None, None]
        x = torch.where(inside, colour.expand_as(x), x)
    return x


def autoencoder_task(gen: torch.Generator) -> Task:
    """Lesson 7: the autoencoder procedure runs the learner's ae_step(ae, optimizer, x, kl_weight) AE_STEPS times on
    batches of a fresh pool of rectangle images with a KL weight of 5e-4 to 2e-3; the judge keeps AE_TEST images
    the worker never sees."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    kl_weight = float(f"{math.exp(_uniform(gen, math.log(5e-4), math.log(2e-3))):.2g}")
    inputs = {"seed": seed, "data": rectangle_images(AE_POOL, gen), "kl_weight": kl_weight}
    return Task([Call(inputs, procedure="train_autoencoder")],
                {"seed": seed, "kl_weight": kl_weight, "test": rectangle_images(AE_TEST, gen)})


class PairedConcepts:
    """Concepts (a, b), a in 0 .. n_a - 1 and b in 0 .. n_b - 1: the 'image' of a concept is f_a + g_b plus Gaussian
    noise (vectors of CLIP_DIM), its 'caption' the two tokens [a, n_a + b]."""

    def __init__(self, f: torch.Tensor, g: torch.Tensor, noise: float):
        self.f, self.g, self.noise = f, g, noise
        self.n_a, self.n_b = len(f), len(g)
        self.k = self.n_a * self.n_b

    def captions(self, concepts: torch.Tensor) -> torch.Tensor:
        return torch.stack([concepts // self.n_b, self.n_a + concepts % self.n_b], 1)

    def images(self, concepts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        a, b = concepts // self.n_b, concepts % self.n_b
        return self.f[a] + self.g[b] + self.noise * torch.randn(len(concepts), self.f.shape[1], generator=gen)


def paired_concepts(gen: torch.Generator) -> PairedConcepts:
    """6-8 values of each attribute (36-64 concepts), their vectors of norm about 1, noise std 0.25-0.35 per
    coordinate (the noise's norm is about 1.5, above the distance between two concepts' means)."""
    n_a, n_b = _randint(gen, 6, 8), _randint(gen, 6, 8)
    f = torch.randn(n_a, CLIP_DIM, generator=gen) / math.sqrt(CLIP_DIM)
    g = torch.randn(n_b, CLIP_DIM, generator=gen) / math.sqrt(CLIP_DIM)
    return PairedConcepts(f, g, round(_uniform(gen, 0.25, 0.35), 3))


def contrastive_task(gen: torch.Generator) -> Task:
    """Lesson 7: contrastive_loss(image_features, text_features, scale) called once on random features (the judge
    compares the value with the reference's), then used by the fitting procedure for CLIP_STEPS batches of
    CLIP_BATCH distinct concepts of a fresh PairedConcepts; the judge keeps held-out images of every concept."""
    b, d = _randint(gen, 6, 12), _randint(gen, 8, 16)
    direct = {"image_features": torch.randn(b, d, generator=gen, dtype=torch.float64) * _uniform(gen, 0.5, 3),
              "text_features": torch.randn(b, d, generator=gen, dtype=torch.float64) * _uniform(gen, 0.5, 3),
              "scale": torch.tensor(round(_uniform(gen, 2.0, 30.0), 3), dtype=torch.float64)}
    pairs = paired_concepts(gen)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    concepts = torch.arange(pairs.k).repeat_interleave(CLIP_PER_CONCEPT)
    fit = {"seed": seed, "images": pairs.images(concepts, gen).float(), "captions": pairs.captions(concepts),
           "concepts": concepts}
    test_concepts = torch.arange(pairs.k).repeat_interleave(10)
    return Task([Call(direct), Call(fit, procedure="fit_contrastive")],
                {"direct": direct, "seed": seed, "pairs": pairs, "test_concepts": test_concepts,
                 "test_images": pairs.images(test_concepts, gen).float()})
