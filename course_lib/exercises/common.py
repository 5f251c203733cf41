"""Helpers the value-graded exercises share: random batch shapes and per-sample broadcasting."""
from __future__ import annotations

import torch

_RESHAPE_HINT = ("A per-sample value of shape (B,) must be reshaped to broadcast over the other "
                 "dimensions, e.g. v.view(-1, *[1] * (x.ndim - 1)).")


def _batch(gen: torch.Generator) -> tuple[int, tuple]:
    b = int(torch.randint(3, 7, (1,), generator=gen))
    shape = [(b, 2), (b, 1, 8, 8), (b, 3, 5, 4)][int(torch.randint(3, (1,), generator=gen))]
    return b, shape


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


# ---- the rules on libraries that perform the operation an exercise teaches (refused by dotted-name prefix) ----------

DIFFUSION_LIBRARIES = ("diffusers", "k_diffusion")
DIFFUSION_RULE = ("Write the formula yourself: diffusers and k-diffusion, which implement it, are not allowed in this "
                  "exercise (nor course_lib's own version); torch and numpy are.")
SAMPLER_LIBRARIES = ("diffusers", "k_diffusion", "scipy.integrate", "torchdiffeq", "torchsde")
SAMPLER_RULE = ("Write the sampler yourself: diffusers' schedulers, k-diffusion, scipy.integrate, torchdiffeq and "
                "torchsde are not allowed in this exercise (nor course_lib's samplers); torch and numpy are.")
ATTENTION_LIBRARIES = ("torch.nn.functional.scaled_dot_product_attention", "torch.nn.functional.multi_head_attention_forward",
                       "torch.nn.MultiheadAttention", "torch.nn.modules.MultiheadAttention",
                       "torch.nn.modules.activation.MultiheadAttention", "torch._C._nn.scaled_dot_product_attention",
                       "torch.ops.aten", "diffusers", "xformers", "flash_attn", "timm", "transformers")
ATTENTION_RULE = ("Write the attention yourself (scores, mask, softmax, weighted sum): torch's "
                  "scaled_dot_product_attention and MultiheadAttention, diffusers, xformers, flash-attn, timm and "
                  "transformers are not allowed in this exercise (nor course_lib's attention); einsum, einops and any "
                  "other tensor operation are.")
ODE_LIBRARIES = ("scipy.integrate", "torchdiffeq", "torchsde", "diffusers")
ODE_RULE = ("Write the Runge-Kutta steps yourself: scipy.integrate, torchdiffeq and torchsde are not allowed in this "
            "exercise (nor course_lib's likelihood); torch.autograd and torch.func for the trace are.")
