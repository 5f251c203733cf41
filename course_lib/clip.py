"""A miniature CLIP (Radford et al. 2021): contrastive pretraining of the text encoder against an image encoder on
shapes captions; its text encoder is then frozen and conditions latent diffusion, as SD's CLIP text encoder does."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checkpoints as ckpt_io
from .attributes import dataset
from .nets import MiniCLIP, TextEncoder
from .shapes import MAX_WORDS, VOCAB, canonical_caption, tokenize

CLIP_CONFIG = dict(dim=64, depth=2, heads=4, embed_dim=64, image_base=32)


def contrastive_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The symmetric InfoNCE loss of CLIP (Radford et al. 2021, fig. 3), with every pair whose `tokens` are identical
    counted as a positive (a batch of shapes captions repeats some; plain CLIP would call them negatives). Pass the
    tokens of the canonical captions so that 'a red circle left of a blue square' and 'a blue square right of a red
    circle', which no image can tell apart, are positives of each other too."""
    same = (tokens[:, None, :] == tokens[None, :, :]).all(-1).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_clip(steps: int = 2000, n_train: int = 20_000, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
               progress: bool = True) -> tuple[MiniCLIP, dict]:
    """Train text and image encoders together on (image, caption) pairs; returns the model (eval) and its card."""
    from .fit import fit

    torch.manual_seed(seed)
    clip = MiniCLIP(len(VOCAB), max_len=MAX_WORDS, **CLIP_CONFIG)
    images, captions, _ = dataset(n_train, "train", seed)
    tokens = tokenize(list(captions))
    same_as = tokenize([canonical_caption(c) for c in captions])  # which captions mean the same scene
    g = torch.Generator().manual_seed(seed)

    def loss_fn(step):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        return contrastive_loss(clip(images[idx], tokens[idx]), same_as[idx])

    clip, log = fit(clip, loss_fn, steps, lr=lr, weight_decay=0.01, desc="mini-CLIP", progress=progress)
    card = {"steps": steps, "seed": seed, "train_images": n_train, "batch_size": batch_size,
            "train_seconds": round(log["seconds"], 1), "final_loss": round(sum(log["losses"][-100:]) / len(log["losses"][-100:]), 4),
            "temperature": round(1 / clip.log_scale.exp().item(), 4)}
    for split in ("test", "heldout"):
        images_s, captions_s, _ = dataset(1000, split, 0)
        card[f"retrieval_{split}"] = retrieval(clip, images_s, list(captions_s))
    return clip, card


@torch.no_grad()
def retrieval(clip: MiniCLIP, images: torch.Tensor, captions: list[str]) -> dict:
    """Top-1 retrieval among the distinct captions of a set: image -> caption (is the best-scoring caption the
    image's own?) and caption -> image (is the best-scoring image one that carries this caption?). Captions are
    compared in canonical form, so two wordings of one two-object scene count as the same caption."""
    captions = [canonical_caption(c) for c in captions]
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    own = torch.tensor([index[c] for c in captions])
    img = clip.image(images)
    txt = clip.text.pooled(tokenize(distinct))
    sim = img @ txt.T  # (images, distinct captions)
    i2t = (sim.argmax(1) == own).float().mean().item()
    t2i = (own[sim.argmax(0)] == torch.arange(len(distinct))).float().mean().item()
    return {"image_to_text": round(i2t, 4), "text_to_image": round(t2i, 4), "captions": len(distinct),
            "images": len(captions), "chance_image_to_text": round(1 / len(distinct), 4)}


def load_text_encoder(path=None) -> TextEncoder:
    """The text half of the shipped mini-CLIP (data/shapes_clip.pt), frozen and in eval mode."""
    return ckpt_io.load_model(path or ckpt_io.shipped_dir() / "shapes_clip.pt").model.text


def load_clip(path=None) -> MiniCLIP:
    return ckpt_io.load_model(path or ckpt_io.shipped_dir() / "shapes_clip.pt").model


@torch.no_grad()
def clip_score(clip: MiniCLIP, images: torch.Tensor, captions, batch: int = 500) -> torch.Tensor:
    """CLIPScore per image (Hessel et al. 2021, as torchmetrics' CLIPScore computes it): 100 times the cosine
    similarity of the image's embedding and its caption's, floored at 0; here with the shipped mini-CLIP (lesson 7),
    whose text half also conditions the model being judged, so the score shares the model's reading of words."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (n, 3, 32, 32) tensor, got {getattr(images, 'shape', images)!r}")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    out = []
    for i in range(0, len(images), batch):
        img = clip.image(images[i:i + batch].float().cpu())
        txt = clip.text.pooled(tokenize(captions[i:i + batch]))
        out.append(100 * (img * txt).sum(1).clamp(min=0))
    return torch.cat(out)
