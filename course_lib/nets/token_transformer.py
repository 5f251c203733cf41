"""The token model of lesson 10: a small transformer over a whole sequence, bidirectional for masked diffusion
(every position sees every other: MDLM's denoiser, Sahoo et al. 2024) or causal for the autoregressive baseline
(position i sees positions <= i only, Vaswani et al. 2017), so both sides of the comparison have the same size."""
from __future__ import annotations

import torch
from torch import nn


class TokenTransformer(nn.Module):
    """Token ids (B, L) -> logits (B, L, vocab_size). causal=False: a denoiser of masked sequences (the [MASK] id is an
    ordinary input token); causal=True: logits at i predict token i + 1 (the caller shifts), seeing tokens <= i."""

    def __init__(self, vocab_size: int, max_len: int, dim: int = 128, depth: int = 4, heads: int = 4,
                 causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if vocab_size < 2 or max_len < 1:
            raise ValueError(f"need vocab_size >= 2 and max_len >= 1, got {vocab_size} and {max_len}")
        self.config = dict(kind="token_transformer", vocab_size=vocab_size, max_len=max_len, dim=dim, depth=depth,
                           heads=heads, causal=causal)
        self.tokens = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(0.02 * torch.randn(max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected integer token ids of shape (B, L), got {tuple(tokens.shape)} {tokens.dtype}")
        n = tokens.shape[1]
        if n > self.config["max_len"]:
            raise ValueError(f"sequences of at most {self.config['max_len']} tokens, got {n}")
        if ((tokens < 0) | (tokens >= self.config["vocab_size"])).any():
            raise ValueError(f"token ids must lie in [0, {self.config['vocab_size']})")
        h = self.tokens(tokens) + self.position[:n]
        mask = None
        if self.config["causal"]:
            mask = torch.triu(torch.full((n, n), float("-inf"), device=tokens.device), diagonal=1)
        h = self.blocks(h, mask=mask, is_causal=self.config["causal"])
        return self.head(self.norm(h))
