"""A tiny transformer text encoder and a miniature CLIP (Radford et al. 2021): captions and images embedded in one
space by a contrastive loss; the text encoder's token states then condition latent diffusion, frozen, as in SD."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TextEncoder(nn.Module):
    """Token ids (B, L), 0 = padding -> token states (B, L + 1, dim): a learned start token is prepended, so even the
    empty caption has one state (the 'null' condition of classifier-free guidance). Padding is masked out of the
    attention (key padding mask), so changing what sits in a padded position changes no real token's state."""

    def __init__(self, vocab_size: int, dim: int = 64, depth: int = 2, heads: int = 4, max_len: int = 10,
                 embed_dim: int = 64):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.config = dict(kind="text_encoder", vocab_size=vocab_size, dim=dim, depth=depth, heads=heads,
                           max_len=max_len, embed_dim=embed_dim)
        self.dim = dim
        self.tokens = nn.Embedding(vocab_size, dim)
        self.start = nn.Parameter(0.02 * torch.randn(dim))
        self.position = nn.Parameter(0.02 * torch.randn(max_len + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, L + 1, dim), valid (B, L + 1) bool: True for the start token and every real word).

        `mask` (B, L) says which positions hold words (default: tokens != 0)."""
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected integer token ids of shape (B, L), got {tuple(tokens.shape)} {tokens.dtype}")
        b, n = tokens.shape
        if n > self.config["max_len"]:
            raise ValueError(f"captions of at most {self.config['max_len']} tokens, got {n}")
        if ((tokens < 0) | (tokens >= self.config["vocab_size"])).any():
            raise ValueError(f"token ids must lie in [0, {self.config['vocab_size']})")
        mask = tokens != 0 if mask is None else mask.bool()
        if mask.shape != tokens.shape:
            raise ValueError(f"mask must have the tokens' shape {tuple(tokens.shape)}, got {tuple(mask.shape)}")
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=tokens.device), mask], dim=1)
        h = torch.cat([self.start.expand(b, 1, -1), self.tokens(tokens)], dim=1) + self.position[:n + 1]
        h = torch.where(valid[..., None], h, torch.zeros_like(h))  # nothing of a padded position enters
        h = self.blocks(h, src_key_padding_mask=~valid)
        return self.norm(h), valid

    def pooled(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One unit-length embedding per caption: the masked mean of the token states, projected (B, embed_dim)."""
        h, valid = self(tokens, mask)
        w = valid.float()[..., None]
        return F.normalize(self.proj((h * w).sum(1) / w.sum(1)), dim=-1)


class ImageEncoder(nn.Module):
    """A 32x32 image -> a unit-length embedding: three strided conv stages and a linear head."""

    def __init__(self, in_channels: int = 3, base: int = 32, embed_dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, base, 3, padding=1), nn.SiLU(),
            nn.Conv2d(base, 2 * base, 3, stride=2, padding=1), nn.SiLU(),       # 16x16
            nn.Conv2d(2 * base, 4 * base, 3, stride=2, padding=1), nn.SiLU(),   # 8x8
            nn.Conv2d(4 * base, 4 * base, 3, stride=2, padding=1), nn.SiLU(),   # 4x4
            nn.Flatten(), nn.Linear(64 * base, 4 * base), nn.SiLU(), nn.Linear(4 * base, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (3, 32, 32):
            raise ValueError(f"expected images of shape (B, 3, 32, 32), got {tuple(x.shape)}")
        return F.normalize(self.net(x), dim=-1)


class MiniCLIP(nn.Module):
    """A text encoder and an image encoder trained so that a caption's embedding is nearest its image's (CLIP)."""

    def __init__(self, vocab_size: int, dim: int = 64, depth: int = 2, heads: int = 4, max_len: int = 10,
                 embed_dim: int = 64, image_base: int = 32):
        super().__init__()
        self.config = dict(kind="mini_clip", vocab_size=vocab_size, dim=dim, depth=depth, heads=heads,
                           max_len=max_len, embed_dim=embed_dim, image_base=image_base)
        self.text = TextEncoder(vocab_size, dim, depth, heads, max_len, embed_dim)
        self.image = ImageEncoder(3, image_base, embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's initial temperature

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B_images, B_captions): scaled cosine similarities."""
        return self.log_scale.exp().clamp(max=100) * self.image(images) @ self.text.pooled(tokens).T
