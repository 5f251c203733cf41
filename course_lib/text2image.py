"""Text-to-image diffusion in miniature: a TextUNet (or a DiT with cross-attention) on the autoencoder's scaled latents (latent diffusion, Rombach et
al. 2022) or on pixels, conditioned on the frozen mini-CLIP text encoder, with classifier-free guidance on the caption
(Ho & Salimans 2022: the empty caption is the unconditional model, learned by caption dropout)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import checkpoints as ckpt_io
from .attributes import dataset
from .guidance import _check_scale, caption_guided
from .losses import diffusion_loss
from .nets import DiT, KLAutoencoder, TextEncoder, TextUNet
from .samplers import Denoiser, as_denoiser, karras_sigmas, sample, steps_for_nfe
from .schedules import NoiseSchedule
from .shapes import MAX_WORDS, tokenize

SPACES = ("latent", "pixel")
SCHEDULE = dict(name="cosine", T=1000)
UNETS = {"latent": dict(base=48, mults=[1, 2], num_res=1, heads=4),      # 8x8x4 latents: levels 8x8, 4x4
         "pixel": dict(base=48, mults=[1, 2, 2], num_res=1, heads=4)}    # 32x32x3 pixels: 32, 16, 8
# Lesson 8's transformer on the same latents: patch 2 (16 tokens of 2x2x4), 1.80M parameters against the UNet's 1.73M
DITS = {"latent": dict(patch=2, hidden=128, depth=5, heads=4),
        "pixel": dict(patch=4, hidden=128, depth=5, heads=4)}
NETS = ("unet", "dit")
DEFAULT_SCALE = 3.0   # the guidance scale lesson 7 recommends (bench t2i measures the sweep); replaced by the card's
DEFAULT_NFE = 20
# Sampling starts at sigma = 20, not at the clipped cosine schedule's last level (sigma = 20,291): at 20 the noisy
# marginal of unit-variance latents has std sqrt(1 + 20^2), within 0.13% of pure noise's, and Karras spacing from
# 20,000 spends most of a 10-20 step budget where nothing can be learned (lesson 7 measures both).
SIGMA_MAX = 20.0


def caption_guidance(denoiser: Denoiser, scale: float, null_context: torch.Tensor, null_mask: torch.Tensor) -> Denoiser:
    """D_w(x, sigma, c) = D(x, sigma, empty) + w (D(x, sigma, c) - D(x, sigma, empty)) (Ho & Salimans 2022, eq. 6);
    w = 1 is the conditional model, 0 the unconditional one. Both predictions come from one batch of 2B.

    `null_context` / `null_mask` are the empty caption's states (1, L, D) and mask (1, L); the conditional context is
    passed at sampling time as model_kwargs {'context': ..., 'mask': ...}."""
    scale = _check_scale(scale)

    def fn(x, sigma, context=None, mask=None):
        if context is None or mask is None:
            raise ValueError("caption guidance needs context= and mask= (TextToImage.condition(prompts))")
        if scale == 1.0:
            return denoiser(x, sigma, context=context, mask=mask)
        return caption_guided(denoiser, x, sigma, context, mask, null_context, null_mask, scale)

    return Denoiser(fn, denoiser.sigma_min, denoiser.sigma_max, denoiser.clip, denoiser.schedule, denoiser.sampling)


@dataclass
class TextToImage:
    """A text-to-image model: denoiser, noise schedule, frozen text encoder, and (latent space) the autoencoder and
    its scale factor. `generate(prompts)` returns images in [-1, 1]."""

    unet: TextUNet | DiT
    schedule: NoiseSchedule | None  # None for a latent consistency model (lesson 12)
    text_encoder: TextEncoder
    autoencoder: KLAutoencoder | None = None
    scale_factor: float = 1.0
    card: dict = field(default_factory=dict)
    tokenizer: object = None  # captions -> token ids; None: shapes.tokenize (lesson 13 adds a word: concepts.tokenize)

    @property
    def space(self) -> str:
        return "pixel" if self.autoencoder is None else "latent"

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape the diffusion runs in: (4, 8, 8) latents or (3, 32, 32) pixels."""
        if self.autoencoder is None:
            return (3, 32, 32)
        f, z = self.autoencoder.factor, self.autoencoder.config["z_channels"]
        return (z, 32 // f, 32 // f)

    @property
    def few_step(self) -> bool:
        """A latent consistency model (lesson 12): guidance folded in, sampled by the consistency sampler."""
        return self.unet.config.get("kind") == "consistency"

    @torch.no_grad()
    def condition(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's token states and valid mask for prompts (a str or a list; '' is the empty caption).
        Unknown words are a ValueError listing the vocabulary."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("give at least one prompt")
        dev = next(self.unet.parameters()).device
        tok = self.tokenizer or tokenize
        tokens = torch.stack([torch.zeros(MAX_WORDS, dtype=torch.long) if p.strip() == "" else tok(p)[0]
                              for p in prompts])
        return tuple(t.to(dev) for t in self.text_encoder(tokens.to(next(self.text_encoder.parameters()).device)))

    def denoiser(self, scale: float = 1.0) -> Denoiser:
        """D(x, sigma, context=, mask=) with caption guidance at `scale` (1: no guidance)."""
        base = as_denoiser(self.unet, self.schedule)
        null_c, null_m = self.condition("")
        return caption_guidance(base, scale, null_c, null_m)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion outputs to images: decode scaled latents (z / scale_factor), or clamp pixels."""
        if self.autoencoder is None:
            return x.clamp(-1, 1)
        from .autoencoder import decode
        return decode(self.autoencoder, x / self.scale_factor)

    @torch.no_grad()
    def generate(self, prompts, scale: float | None = None, nfe: int = DEFAULT_NFE, sampler: str | None = None,
                 seed: int = 0, batch: int = 250, progress: bool = False, return_latents: bool = False,
                 sigma_max: float = SIGMA_MAX):
        """Images (n, 3, 32, 32) in [-1, 1] for the prompts, sampled with `sampler` at about `nfe` network
        evaluations per guidance branch on Karras noise levels from `sigma_max` down to the schedule's smallest; scale
        defaults to the model card's best (DEFAULT_SCALE without a card). A latent consistency model (`few_step`) takes
        no scale (its guidance is folded in) and samples with the consistency sampler on few_step_levels(nfe)."""
        from .consistency import few_step_levels

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.few_step:
            if scale not in (None, 1.0):
                raise ValueError(f"this latent consistency model has guidance w = {self.card.get('guidance', '?')} "
                                 f"folded in: it takes no guidance scale (got scale={scale!r})")
            scale, sampler = 1.0, sampler or "consistency"
        elif sampler == "consistency":
            raise ValueError("the consistency sampler needs a consistency model; this one is a diffusion model")
        sampler = sampler or "dpmpp_2m"
        scale = self.card.get("best_scale", DEFAULT_SCALE) if scale is None else scale
        den = self.denoiser(scale)
        top = min(float(sigma_max), den.sigma_max)
        sigmas = few_step_levels(nfe, den.sigma_min, top) if sampler == "consistency" else \
            karras_sigmas(steps_for_nfe(sampler, nfe), den.sigma_min, top, 7.0)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(prompts), *self.shape), generator=g)
        dev = next(self.unet.parameters()).device
        outs = []
        chunks = range(0, len(prompts), batch)
        if progress and len(chunks) > 1:
            from tqdm.auto import tqdm
            chunks = tqdm(chunks, desc=f"generate ({self.space})", unit="batch")
        for i in chunks:
            ctx, mask = self.condition(prompts[i:i + batch])
            res = sample(den, noise[i:i + batch].to(dev), sampler=sampler, sigmas=sigmas, generator=g,
                         model_kwargs={"context": ctx, "mask": mask})
            outs.append(res.x.cpu())
        x = torch.cat(outs)
        return x if return_latents else self.to_images(x)


def train_text_to_image(space: str = "latent", steps: int = 4000, n_train: int = 20_000, batch_size: int = 64,
                        lr: float = 1e-3, caption_dropout: float = 0.1, seed: int = 0, text_encoder=None,
                        autoencoder=None, scale_factor: float | None = None, progress: bool = True,
                        eval_every: int = 0, eval_prompts: int = 200, net: str = "unet",
                        **unet_config) -> tuple[TextToImage, dict]:
    """Train a TextUNet (net='dit': a DiT with cross-attention, lesson 8) on (latents or pixels, caption) pairs with the eps loss (Ho et al. 2020, eq. 14) and caption
    dropout: a share `caption_dropout` of captions is replaced by the empty caption, so one network also learns the
    unconditional model that guidance needs. The text encoder (and autoencoder) stay frozen."""
    from .autoencoder import encode, load_autoencoder
    from .clip import load_text_encoder
    from .fit import fit

    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if net not in NETS:
        raise ValueError(f"net must be one of {NETS}, got {net!r}")
    if not 0 <= caption_dropout < 1:
        raise ValueError(f"need 0 <= caption_dropout < 1, got {caption_dropout!r}")
    text = (text_encoder or load_text_encoder()).eval().requires_grad_(False)
    ae = None
    if space == "latent":
        if autoencoder is None:
            autoencoder, shipped_scale = load_autoencoder()
            scale_factor = shipped_scale if scale_factor is None else scale_factor
        ae = autoencoder.eval().requires_grad_(False)
        if scale_factor is None:
            raise ValueError("give the autoencoder's scale_factor (its card's) with autoencoder=")
    images, captions, _ = dataset(n_train, "train", seed)
    x_all = encode(ae, images) * scale_factor if ae is not None else images
    tokens = tokenize(list(captions))
    torch.manual_seed(seed)
    if net == "dit":
        unet = DiT(in_channels=x_all.shape[1], image_size=x_all.shape[-1], context_dim=text.dim,
                   **{**DITS[space], **unet_config})
    else:
        unet = TextUNet(in_channels=x_all.shape[1], context_dim=text.dim, **{**UNETS[space], **unet_config})
    schedule = NoiseSchedule.named(SCHEDULE["name"], SCHEDULE["T"])
    g = torch.Generator().manual_seed(seed)

    def loss_fn(step):
        idx = torch.randint(len(x_all), (batch_size,), generator=g)
        tok = tokens[idx].clone()
        tok[torch.rand(batch_size, generator=g) < caption_dropout] = 0  # the empty caption
        with torch.no_grad():
            ctx, mask = text(tok)
        return diffusion_loss(unet, x_all[idx], schedule, unet.prediction, generator=g, context=ctx, mask=mask)

    curve = []
    sf = scale_factor if ae is not None else 1.0

    def evaluate(step, net, seconds):  # prompt adherence of the EMA so far: the learning curve in the card
        curve.append({"step": step, "seconds": round(seconds, 1),
                      **probe_adherence(TextToImage(net, schedule, text, ae, sf), eval_prompts)})

    ema, log = fit(unet, loss_fn, steps, lr=lr, ema=0.999, desc=f"{space} diffusion", progress=progress,
                   callback=evaluate if eval_every else None, every=eval_every)
    model = TextToImage(ema, schedule, text, ae, sf)
    if eval_every:
        evaluate(steps, ema, log["seconds"])
    card = {"space": space, "net": net, "steps": steps, "batch_size": batch_size, "train_images": n_train, "seed": seed,
            "caption_dropout": caption_dropout, "train_seconds": round(log["seconds"], 1),
            "seconds_per_step": round(log["seconds"] / steps, 4),
            "final_loss": round(sum(log["losses"][-200:]) / len(log["losses"][-200:]), 5),
            "schedule": SCHEDULE, "scale_factor": sf, "parameters": sum(p.numel() for p in ema.parameters())}
    if curve:
        card["curve"] = curve
    model.card = card
    return model, card


def _prompts(n: int, split: str, seed: int, single: bool) -> list[str]:
    from .shapes import make_shapes

    out, k = [], 0
    while len(out) < n:
        _, caps, _ = make_shapes(max(2 * n, 50), split, seed + k)
        out += [c for c in caps if (" at the " in c) == single]
        k += 1000
    return out[:n]


def single_object_prompts(n: int, split: str = "test", seed: int = 0) -> list[str]:
    """n fully specified one-object prompts ('a small red circle at the top left'): a split's captions."""
    return _prompts(n, split, seed, True)


def two_object_prompts(n: int, split: str = "test", seed: int = 0) -> list[str]:
    """n two-object prompts ('a red circle left of a blue square'): a split's captions."""
    return _prompts(n, split, seed, False)


def probe_adherence(model: TextToImage, n: int = 200, scale: float = DEFAULT_SCALE, nfe: int = 10) -> dict:
    """A quick read of prompt adherence (attribute accuracy on one-object test prompts) for learning curves."""
    from .attributes import adherence, load_attribute_classifier

    prompts = single_object_prompts(n)
    images = model.generate(prompts, scale=scale, nfe=nfe, seed=1)
    acc = adherence(load_attribute_classifier(), images, prompts)
    return {k: acc[k] for k in ("shape", "colour", "position", "size", "all")}


def export(model: TextToImage, path, card: dict, preset: str):
    """Write the denoiser with its card; the autoencoder and text encoder are the shipped ones, named in the config."""
    config = {"preset": preset, "space": model.space, "schedule": SCHEDULE, "text_encoder": "shapes_clip",
              "autoencoder": "shapes_ae" if model.space == "latent" else None}
    state = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": "weights", "config": config,
             "model_config": model.unet.config,
             # half precision on disk keeps the file a few MB (as SD ships fp16 weights); loading casts back to float32
             "weights": {k: v.detach().cpu().half() for k, v in model.unet.state_dict().items()}, "card": card}
    return ckpt_io.save_atomic(state, path)


def load_text_to_image(name_or_path: str = "shapes_ldm", device=None) -> TextToImage:
    """A shipped text-to-image model ('shapes_ldm' in latent space, 'shapes_pixel' in pixel space, 'shapes_dit' the
    transformer in latent space) or a file written
    by `python -m course_lib train --preset shapes_ldm`, ready to generate."""
    from pathlib import Path

    from .autoencoder import load_autoencoder
    from .clip import load_text_encoder

    path = Path(name_or_path)
    if str(name_or_path) in ("shapes_ldm", "shapes_pixel", "shapes_dit", "shapes_dit_long", "shapes_lcm"):
        path = ckpt_io.shipped_dir() / f"{name_or_path}.pt"
    loaded = ckpt_io.load_model(path, device)
    config = loaded.config
    if config.get("family") == "latent_consistency":  # lesson 12's student, exported by the training loop
        config = {"space": "latent", "schedule": None}
        if loaded.model.config["denoiser"]["net"].get("context_dim") is None:
            raise ValueError(f"{path} holds a consistency model without text conditioning")
    elif not (loaded.model.config.get("kind") == "text_unet" or loaded.model.config.get("context_dim")):
        raise ValueError(f"{path} holds no text-to-image denoiser (kind {loaded.model.config.get('kind')!r})")
    text = load_text_encoder()
    ae, scale = (None, 1.0)
    if config.get("space") == "latent":
        ae, scale = load_autoencoder()
        scale = float(loaded.card.get("scale_factor", scale))
    if device is not None:
        text.to(device)
        ae = ae.to(device) if ae is not None else None
    schedule = NoiseSchedule.named(config["schedule"]["name"], config["schedule"]["T"]) if config["schedule"] else None
    return TextToImage(loaded.model, schedule, text, ae, scale, loaded.card)


def image_grid(images: torch.Tensor, rows: int = 1, upscale: int = 4) -> torch.Tensor:
    """Images (n, 3, H, W) in [-1, 1] as one uint8 (rows*H*up, cols*W*up, 3) grid with 1-pixel grey gutters."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape (n, 3, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    cols = -(-n // rows)
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    H, W = h * upscale + 1, w * upscale + 1
    grid = torch.full((rows * H + 1, cols * W + 1, 3), 128, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[1 + r * H:(r + 1) * H, 1 + c * W:(c + 1) * W] = x[i].permute(1, 2, 0)
    return grid


def save_grid(images: torch.Tensor, path, rows: int = 1, upscale: int = 4, labels: list[str] | None = None) -> None:
    """Write image_grid(images) as a PNG (Pillow), atomically; with `labels` (one per row), each row's text is
    written in a band above it."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    from .checkpoints import write_bytes_atomic

    grid = Image.fromarray(image_grid(images, rows, upscale).numpy())
    if labels is not None:
        if len(labels) != rows:
            raise ValueError(f"give one label per row: {rows} rows, {len(labels)} labels")
        font = ImageFont.load_default()
        band = 16
        row_h = (grid.height - 1) // rows
        out = Image.new("RGB", (grid.width, grid.height + rows * band), (255, 255, 255))
        draw = ImageDraw.Draw(out)
        for r, text in enumerate(labels):
            top = r * (row_h + band)
            draw.text((4, top + 2), text, fill=(0, 0, 0), font=font)
            out.paste(grid.crop((0, r * row_h, grid.width, (r + 1) * row_h + 1)), (0, top + band))
        grid = out
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    write_bytes_atomic(buf.getvalue(), path)
