"""ControlNet in miniature (Zhang, Rao & Agrawala 2023): a trainable copy of a frozen text UNet's encoder reads a
layout map (where the objects should be), and its features enter the frozen UNet's skip connections through
zero-initialised 1x1 convolutions (eq. 4), so a fresh ControlNet leaves the model exactly as it was.

The layout maps come from the shapes generator (each object's coverage); placement is judged from the generated
image alone: the object's pixels (anything not background) against the map, as an IoU.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .nets.blocks import _batch_t, timestep_embedding
from .nets.cross_attention import CrossAttention, TextUNet


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(nn.Module):
    """The trainable copy of `unet`'s time embedding, stem, down path and middle (initialised to its weights), a small
    conv encoder taking the (B, hint_channels, 32, 32) layout map down to the latent's size, and one zero conv per
    skip connection and for the middle. Calling it gives the residuals TextUNet(..., control=) adds."""

    def __init__(self, unet: TextUNet, hint_channels: int = 1, hint_size: int = 32, latent_size: int = 8):
        super().__init__()
        if not isinstance(unet, TextUNet):
            raise TypeError(f"a ControlNet copies a TextUNet's encoder, got {type(unet).__name__}")
        steps = math.log2(hint_size / latent_size)
        if steps != int(steps) or steps < 0:
            raise ValueError(f"the hint size ({hint_size}) must be the latent size ({latent_size}) times a power of 2")
        self.config = {"kind": "controlnet", "hint_channels": hint_channels, "hint_size": hint_size,
                       "latent_size": latent_size, "unet": dict(unet.config)}
        self.base = unet.base
        self.time, self.stem = copy.deepcopy(unet.time), copy.deepcopy(unet.stem)
        self.down, self.mid = copy.deepcopy(unet.down), copy.deepcopy(unet.mid)
        layers, ch = [nn.Conv2d(hint_channels, 16, 3, padding=1), nn.SiLU()], 16
        for _ in range(int(steps)):
            layers += [nn.Conv2d(ch, 32, 3, stride=2, padding=1), nn.SiLU()]
            ch = 32
        self.hint = nn.Sequential(*layers, _zero_conv_to(ch, unet.base))
        with torch.no_grad():  # the channels of each skip connection and of the middle, from one dummy pass
            c = unet.config
            probe = torch.zeros(1, c["in_channels"], latent_size, latent_size)
            hs, h = self._encode(probe, torch.zeros(1), torch.zeros(1, 1, c["context_dim"]),
                                 torch.ones(1, 1, dtype=torch.bool), self.stem(probe))
        self.zero = nn.ModuleList([_zero_conv(a.shape[1]) for a in hs])
        self.zero_mid = _zero_conv(h.shape[1])

    def _run(self, layers, h, emb, context, mask):
        for sub in layers:
            h = sub(h, context, mask) if isinstance(sub, CrossAttention) else sub(h, emb)
        return h

    def _encode(self, x, t, context, mask, h):
        emb = F.silu(self.time(timestep_embedding(_batch_t(t, x), self.base).to(x.dtype)))
        hs = [h]
        for layer in self.down:
            h = self._run(layer, h, emb, context, mask) if isinstance(layer, nn.ModuleList) else layer(h)
            hs.append(h)
        return hs, self._run(self.mid, h, emb, context, mask)

    def forward(self, x: torch.Tensor, t, context: torch.Tensor, mask: torch.Tensor, hint: torch.Tensor) -> list:
        size = self.config["hint_size"]
        if hint.ndim != 4 or hint.shape[0] != x.shape[0] or hint.shape[1:] != (self.config["hint_channels"], size, size):
            raise ValueError(f"hint must have shape ({x.shape[0]}, {self.config['hint_channels']}, {size}, {size}), "
                             f"got {tuple(hint.shape)}")
        hs, h = self._encode(x, t, context, mask, self.stem(x) + self.hint(hint.to(x.dtype)))
        return [z(a) for z, a in zip(self.zero, hs)] + [self.zero_mid(h)]


def _zero_conv_to(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class Controlled(nn.Module):
    """The frozen UNet steered by a ControlNet: model(x, t, context=, mask=) with the layout maps set by `set_hint`
    (so every sampler and caption guidance run it unchanged; a batch of 2B under guidance gets the maps twice)."""

    def __init__(self, unet: TextUNet, controlnet: ControlNet, strength: float = 1.0):
        super().__init__()
        self.unet, self.controlnet, self.strength = unet, controlnet, float(strength)
        self.unet.requires_grad_(False)
        self.config, self.prediction = unet.config, unet.prediction
        self._hint = None

    def set_hint(self, hint: torch.Tensor | None) -> "Controlled":
        self._hint = hint
        return self

    def forward(self, x, t, context=None, mask=None, y=None):
        if self._hint is None or self.strength == 0:
            return self.unet(x, t, context=context, mask=mask, y=y)
        hint = self._hint.to(x.device)
        if x.shape[0] != hint.shape[0]:
            if x.shape[0] % hint.shape[0]:
                raise ValueError(f"{x.shape[0]} rows but {hint.shape[0]} layout maps")
            hint = hint.repeat(x.shape[0] // hint.shape[0], 1, 1, 1)
        residuals = self.controlnet(x, t, context, mask, hint)
        return self.unet(x, t, context=context, mask=mask, y=y, control=[self.strength * r for r in residuals])


# ---- layout maps and placement --------------------------------------------------------------------------------


def layout_maps(scenes: list[dict]) -> torch.Tensor:
    """(n, 1, 32, 32) coverage in [0, 1] of every object of each scene, anti-aliased as the images are drawn."""
    from .shapes import _SUPER, SIZE, SIZES, _mask

    n = SIZE * _SUPER
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / _SUPER
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    maps = []
    for s in scenes:
        m = torch.zeros(n, n, dtype=torch.bool)
        for o in s["objects"]:
            m |= _mask(o["shape"], SIZES[o["size"]], o["centre"], rows, cols)
        maps.append(F.avg_pool2d(m.float()[None, None], _SUPER)[0])
    return torch.stack(maps)


def object_mask(images: torch.Tensor, threshold: float = -0.11) -> torch.Tensor:
    """(n, 1, 32, 32) bool: the pixels an object covers at least half of. Background is -1 and an object's brightest
    channel is 0.9-1, so a pixel covered c reads -1 + 2 c (0.9 to 1): at c = 1/2 at least -0.1, at the next coverage
    the 4x4 supersampling draws (7/16) at most -0.125; the threshold sits between."""
    return (images.amax(dim=1, keepdim=True) > threshold)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union per image of two (n, 1, H, W) masks (coverage maps count where they are >= 1/2); 1
    where both are empty."""
    a, b = a >= 0.5 if a.is_floating_point() else a, b >= 0.5 if b.is_floating_point() else b
    inter, union = (a & b).flatten(1).sum(1).float(), (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _without_position(caption: str) -> str:
    """'a small red circle at the top left' -> 'a small red circle': the map, not the text, says where."""
    return caption.split(" at the ")[0]


def train_controlnet(base, steps: int = 1500, n_train: int = 5000, batch_size: int = 32, lr: float = 1e-3,
                     caption_dropout: float = 0.1, seed: int = 0, progress: bool = True):
    """Train a ControlNet for lesson 7's latent model (frozen) on lesson 7's training scenes with their layout maps,
    one-object captions without their position (the map carries it), with the loss the model was trained with;
    returns (the Controlled model, its card)."""
    from .autoencoder import encode
    from .fit import fit
    from .losses import diffusion_loss
    from .shapes import make_shapes, tokenize

    if base.space != "latent" or base.schedule is None:
        raise ValueError("train_controlnet takes a latent diffusion model (load_text_to_image('shapes_ldm'))")
    images, captions, scenes = make_shapes(n_train, "train", seed)
    with torch.no_grad():
        x_all = encode(base.autoencoder, images) * base.scale_factor
    tokens = tokenize([_without_position(c) for c in captions])
    maps = layout_maps(scenes)
    torch.manual_seed(seed)
    unet = copy.deepcopy(base.unet).eval().requires_grad_(False)
    controlnet = ControlNet(unet, latent_size=x_all.shape[-1])
    model = Controlled(unet, controlnet)
    g = torch.Generator().manual_seed(seed)

    def loss_fn(step):
        idx = torch.randint(len(x_all), (batch_size,), generator=g)
        tok = tokens[idx].clone()
        tok[torch.rand(batch_size, generator=g) < caption_dropout] = 0
        with torch.no_grad():
            ctx, mask = base.text_encoder(tok)
        model.set_hint(maps[idx])
        return diffusion_loss(model, x_all[idx], base.schedule, unet.prediction, generator=g, context=ctx, mask=mask)

    _, log = fit(controlnet, loss_fn, steps, lr=lr, desc="ControlNet", progress=progress,
                 params=controlnet.parameters())
    controlnet.eval().requires_grad_(False)
    model.set_hint(None)
    card = {"steps": steps, "train_images": n_train, "batch_size": batch_size, "lr": lr, "seed": seed,
            "caption_dropout": caption_dropout, "train_seconds": round(log["seconds"], 1),
            "parameters": sum(p.numel() for p in controlnet.parameters()),
            "final_loss": round(sum(log["losses"][-100:]) / len(log["losses"][-100:]), 5)}
    return model, card


def placement(base, controlled: Controlled | None, n: int = 200, seed: int = 0, nfe: int = 20,
              position_in_caption: bool = False) -> dict:
    """How often objects land where the map says: n one-object test scenes, their captions without the position and
    their layout maps; IoU of each image's object pixels with its map, for the controlled model and (controlled None)
    the plain model on the same prompts and noise, whose IoU is the chance level of putting the object anywhere. With
    position_in_caption the plain model is given the full captions instead (lesson 7's way of saying where: one of
    nine places in words), the like-for-like rival of the map."""
    from .shapes import make_shapes

    _, captions, scenes = make_shapes(4 * n, "test", seed + 5)
    one = [i for i, s in enumerate(scenes) if s["relation"] is None][:n]
    if position_in_caption and controlled is not None:
        raise ValueError("position_in_caption is the plain model's rival (controlled=None); a ControlNet reads the map")
    prompts = [captions[i] if position_in_caption else _without_position(captions[i]) for i in one]
    maps = layout_maps([scenes[i] for i in one])
    from .text2image import TextToImage

    model = base if controlled is None else TextToImage(controlled.set_hint(maps), base.schedule, base.text_encoder,
                                                        base.autoencoder, base.scale_factor, base.card)
    images = model.generate(prompts, seed=seed, nfe=nfe)
    if controlled is not None:
        controlled.set_hint(None)
    scores = iou(object_mask(images), maps)
    return {"iou": round(scores.mean().item(), 4), "iou_over_half": round((scores > 0.5).float().mean().item(), 4),
            "prompts": len(prompts), "images": images, "maps": maps, "prompt_list": prompts}
