"""The capstone: a text-to-shapes generator assembled from a learner's own parts (cross-attention, a caption-dropout
training step, a guided sampling loop) around the course's data, autoencoder and text encoder (lesson 7's recipe:
Rombach et al. 2022, latent diffusion with cross-attention; Ho & Salimans 2022, classifier-free guidance).

The course supplies what is not the point of the exercise: the shapes images and captions, the frozen shipped
autoencoder (scaled latents) and text encoder, a TextUNet whose cross-attention layers call the learner's function,
the loop that feeds batches to the learner's step, and the attribute classifier that judges the result.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

UNET = dict(base=24, mults=[1, 2], num_res=1, heads=4)  # on 8x8x4 latents: levels 8x8 and 4x4
SCALE, NFE = 3.0, 20  # lesson 7's recommended guidance scale; steps of the learner's loop (two evaluations each)
LR, BATCH, EMA = 2e-3, 32, 0.995  # per CPU second, small batches and many steps learn the prompts fastest here
JUDGED = ("colour", "shape")  # the attributes the capstone is judged on


class Parts(NamedTuple):
    """The learner's three functions: cross_attention(x, context, mask, w_q, w_k, w_v, heads) (lesson 7),
    train_step(model, optimizer, z0, context, mask, null_context, null_mask, alpha_bar) (lessons 2 and 6, with the
    empty caption for dropout), sample_loop(denoise, x, sigmas, y, scale) (lesson 6)."""

    cross_attention: Callable
    train_step: Callable
    sample_loop: Callable


def as_parts(parts) -> Parts:
    """Parts from a Parts, a dict with the three names, or a function of no arguments that returns either."""
    if callable(parts) and not isinstance(parts, Parts):
        parts = parts()
    if isinstance(parts, dict):
        missing = [k for k in Parts._fields if k not in parts]
        if missing:
            raise ValueError(f"the parts need {', '.join(Parts._fields)}; missing {', '.join(missing)}")
        parts = Parts(**{k: parts[k] for k in Parts._fields})
    if not isinstance(parts, Parts) or not all(callable(p) for p in parts):
        raise TypeError("give the three parts as functions: a dict {'cross_attention': ..., 'train_step': ..., "
                        "'sample_loop': ...} (or a function returning one)")
    return parts


class Kit:
    """What the course supplies, loaded once: the frozen text encoder and autoencoder (with its latent scale factor),
    the noise schedule, and the empty caption's states."""

    def __init__(self):
        from .autoencoder import load_autoencoder
        from .clip import load_text_encoder
        from .schedules import NoiseSchedule
        from .text2image import SCHEDULE

        self.text = load_text_encoder().eval().requires_grad_(False)
        self.ae, self.scale_factor = load_autoencoder()
        self.ae.eval().requires_grad_(False)
        self.schedule = NoiseSchedule.named(SCHEDULE["name"], SCHEDULE["T"])
        self.null_context, self.null_mask = self.condition([""])

    @torch.no_grad()
    def condition(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from .shapes import MAX_WORDS, tokenize

        tokens = torch.stack([torch.zeros(MAX_WORDS, dtype=torch.long) if not p.strip() else tokenize(p)[0]
                              for p in prompts])
        return self.text(tokens)

    @torch.no_grad()
    def data(self, n: int, seed: int = 0) -> dict:
        """n training images of the shapes' train split as scaled latents, with their captions' states and masks."""
        from .attributes import dataset
        from .autoencoder import encode

        images, captions, _ = dataset(n, "train", seed)
        context, mask = self.condition(list(captions))
        return {"latents": encode(self.ae, images) * self.scale_factor, "context": context, "mask": mask}


def network(cross_attention: Callable | None, kit: Kit, seed: int = 0):
    """A fresh TextUNet (UNET) whose cross-attention layers compute with `cross_attention` (None: torch's own)."""
    from .nets import TextUNet
    from .nets.cross_attention import use_attention

    torch.manual_seed(seed)
    unet = TextUNet(in_channels=4, context_dim=kit.text.dim, **UNET)
    use_attention(unet, cross_attention)
    return unet


def train(parts, steps: int, kit: Kit | None = None, n_train: int = 4000, seed: int = 0, progress: bool = True,
          data: dict | None = None) -> tuple[torch.nn.Module, list[float]]:
    """Train a fresh network for `steps` batches of BATCH with the learner's train_step (the learner's attention
    inside); returns its EMA copy (in eval mode) and the losses the step reported."""
    import copy

    parts, kit = as_parts(parts), kit or Kit()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    data = data or kit.data(n_train, seed)
    unet = network(parts.cross_attention, kit, seed)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(unet.parameters(), lr=LR)
    alpha_bar = kit.schedule.alpha_bar.float().clone()
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 2)
    losses = []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="capstone training", unit="step")
    unet.train()
    for step in it:
        idx = torch.randint(len(data["latents"]), (BATCH,), generator=gen)
        losses.append(_as_loss(parts.train_step(unet, optimizer, data["latents"][idx], data["context"][idx],
                                               data["mask"][idx], kit.null_context, kit.null_mask, alpha_bar), step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - EMA)
    return ema, losses


def _as_loss(value, step: int) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"train_step returned {type(value).__name__} at step {step}; return the batch's loss (a number)")


def generate(unet, sample_loop: Callable, prompts: list[str], kit: Kit | None = None, scale: float = SCALE,
             nfe: int = NFE, seed: int = 0) -> torch.Tensor:
    """Latents for the prompts from the learner's sample_loop(denoise, x, sigmas, y, scale): `denoise(x, sigma, y)`
    is the network conditioned on prompts[y] (y: one index per row), `denoise(x, sigma)` on the empty caption; Karras
    levels from text2image.SIGMA_MAX down to the schedule's smallest."""
    from .samplers import as_denoiser
    from .step_schedules import karras_sigmas
    from .text2image import SIGMA_MAX

    kit = kit or Kit()
    den = as_denoiser(unet, kit.schedule)
    context, mask = kit.condition(list(prompts))

    def denoise(x, sigma, y=None):
        if y is None:
            c, m = kit.null_context.expand(len(x), -1, -1), kit.null_mask.expand(len(x), -1)
        else:
            c, m = context[torch.as_tensor(y).long()], mask[torch.as_tensor(y).long()]
        with torch.no_grad():
            return den(x, float(sigma), context=c, mask=m)

    sigmas = karras_sigmas(nfe, den.sigma_min, SIGMA_MAX, 7.0)
    x = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    return sample_loop(denoise, x, sigmas, torch.arange(len(prompts)), scale)


def judge(latents: torch.Tensor, prompts: list[str], kit: Kit | None = None) -> dict:
    """Decode the latents and read them with the shipped attribute classifier: the share right per JUDGED attribute,
    'both' (every judged attribute right in the same image) and the chance level of 'both'."""
    from .attributes import _judge, load_attribute_classifier
    from .autoencoder import decode
    from .grammar import COLOURS, SHAPES

    kit = kit or Kit()
    images = decode(kit.ae, latents.float() / kit.scale_factor)
    want, pred, _ = _judge(load_attribute_classifier(), images, prompts)
    right = {k: pred[k] == want[k] for k in JUDGED}
    out = {k: float(v.float().mean()) for k, v in right.items()}
    out["both"] = float(torch.stack(list(right.values())).all(0).float().mean())
    out["chance"] = 1 / (len(COLOURS) * len(SHAPES))
    return out


def prompts(n: int, seed: int) -> list[str]:
    """n one-object test-split captions ('a small red circle at the top left') from `seed`."""
    from .text2image import single_object_prompts

    return single_object_prompts(n, "test", seed)


def missing_parts(parts, kit: Kit | None = None) -> list[str]:
    """The parts that still raise NotImplementedError (a student copy's stubs), each tried once on small inputs: the
    attention on random tensors, the step on one batch of 32 images, the loop for one prompt in two steps."""
    parts, kit = as_parts(parts), kit or Kit()
    missing = []
    try:
        gen = torch.Generator().manual_seed(0)
        parts.cross_attention(torch.randn(1, 4, 8, generator=gen), torch.randn(1, 3, 8, generator=gen),
                              torch.ones(1, 3, dtype=torch.bool), torch.randn(8, 8, generator=gen),
                              torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen), 2)
    except NotImplementedError:
        missing.append("cross_attention")
    net = network(None if missing else parts.cross_attention, kit)
    data = kit.data(BATCH, 0)
    try:
        parts.train_step(net, torch.optim.Adam(net.parameters()), data["latents"], data["context"], data["mask"],
                         kit.null_context, kit.null_mask, kit.schedule.alpha_bar.float())
    except NotImplementedError:
        missing.append("train_step")
    try:
        generate(net.eval(), parts.sample_loop, ["a red circle"], kit, nfe=2)
    except NotImplementedError:
        missing.append("sample_loop")
    return missing


def attention_error(cross_attention: Callable) -> float:
    """The largest difference between `cross_attention` and torch's fused attention (with the same projections and
    mask) on random inputs: about 1e-6 for a right one."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 4, 6, generator=gen)
    w_q, w_k, w_v = (torch.randn(8, d, generator=gen) for d in (8, 6, 6))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    split = lambda t: t.view(3, t.shape[1], 2, 4).transpose(1, 2)  # noqa: E731  (two heads of 4)
    want = F.scaled_dot_product_attention(split(x @ w_q.T), split(context @ w_k.T), split(context @ w_v.T),
                                          attn_mask=mask[:, None, None, :]).transpose(1, 2).reshape(3, 5, 8)
    got = cross_attention(x, context, mask, w_q, w_k, w_v, 2)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return float("inf")
    return float((got.float() - want).abs().max())


def ready(parts, kit: Kit | None = None) -> bool:
    """True when every part is written and the attention computes what torch's does; otherwise says what is still to
    do (the cells below wait for it)."""
    missing = missing_parts(parts, kit)
    if missing:
        print(f"Still to write: {', '.join(missing)}. The cells below wait for your parts; run them again once "
              "they are written.")
        return False
    error = attention_error(as_parts(parts).cross_attention)
    if not error < 1e-4:
        print(f"Your cross_attention differs from torch's attention by up to {error:.3g} on random inputs: mend it "
              "first (lesson 7's check says how), since every layer of the network uses it.")
        return False
    print("Your three parts run, and your attention computes what torch's does: the cells below train, sample and "
          "measure your generator.")
    return True
