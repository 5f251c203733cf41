"""Stand-ins for trained networks that some exercises receive as inputs (importable where references are not)."""
from __future__ import annotations

import torch


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample value of shape (B,) reshaped to broadcast over `like`'s other dimensions."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class ToyNetwork:
    """A fixed stand-in for a trained network: model(x_t, t) -> a tensor shaped like x_t."""

    def __init__(self, weight: float, T: int):
        self.weight, self.T = weight, T

    def __call__(self, x, t):
        return torch.tanh(self.weight * x + per_sample(t.to(x.dtype) / self.T, x))

    def __repr__(self) -> str:
        return "model(x_t, t) (a fixed toy network)"


class ToyDenoiser:
    """A smooth, nonlinear stand-in for a trained denoiser: denoise(x, sigma) -> a tensor shaped like x."""

    def __init__(self, w: float):
        self.w = w

    def __call__(self, x, sigma):
        return torch.tanh(self.w * x) / (1 + sigma**2) ** 0.5

    def __repr__(self) -> str:
        return "denoise(x, sigma) (a fixed toy denoiser)"


class ToyVelocity:
    """A smooth stand-in for a trained 2D velocity field: velocity(x, t) = tanh(x A^T + t c + b) M^T, x of shape (B, 2)
    and t a float; differentiable in x (for the exact trace of its Jacobian)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, m: torch.Tensor):
        self.a, self.b, self.c, self.m = a, b, c, m

    def __call__(self, x, t):
        return torch.tanh(x @ self.a.T.to(x.dtype) + float(t) * self.c.to(x.dtype) + self.b.to(x.dtype)) @ self.m.T.to(x.dtype)

    def __repr__(self) -> str:
        return "velocity(x, t) (a fixed toy 2D velocity field)"


class ToyRowNetwork:
    """A smooth stand-in for a trained network F(x, sigma) with one noise level per row: tanh(w x + b ln(sigma)),
    sigma of shape (B,) (or one number)."""

    def __init__(self, w: float, b: float):
        self.w, self.b = w, b

    def __call__(self, x, sigma):
        s = torch.as_tensor(sigma, dtype=x.dtype)
        s = s.expand(x.shape[0]) if s.ndim == 0 else s
        return torch.tanh(self.w * x + self.b * per_sample(s.log(), x))

    def __repr__(self) -> str:
        return "network(x, sigma) (a fixed toy network, sigma one per row)"


class ToyRowDenoiser:
    """A smooth stand-in for a trained denoiser D(x, sigma) with one noise level per row (or one number):
    tanh(w x) / sqrt(1 + sigma^2)."""

    def __init__(self, w: float):
        self.w = w

    def __call__(self, x, sigma):
        s = torch.as_tensor(sigma, dtype=x.dtype)
        s = s.expand(x.shape[0]) if s.ndim == 0 else s
        return torch.tanh(self.w * x) / per_sample((1 + s**2).sqrt(), x)

    def __repr__(self) -> str:
        return "teacher(x, sigma) (a fixed toy denoiser, sigma one per row)"


class ToyTextDenoiser:
    """A smooth stand-in for a caption-conditioned denoiser D(x, sigma, context) with one noise level per row (or one
    number) and one context row per sample: tanh(w x + context) / sqrt(1 + sigma^2)."""

    def __init__(self, w: float):
        self.w = w

    def __call__(self, x, sigma, context):
        s = torch.as_tensor(sigma, dtype=x.dtype)
        s = s.expand(x.shape[0]) if s.ndim == 0 else s
        return torch.tanh(self.w * x + context) / per_sample((1 + s**2).sqrt(), x)

    def __repr__(self) -> str:
        return "teacher(x, sigma, context) (a fixed toy text denoiser, sigma one per row)"


class ToyWordLoss:
    """A smooth stand-in for a frozen text-to-image model's denoising loss as a function of its token table: the
    captions' token ids pick rows of the table, a fixed map mixes them, and the loss is the squared distance of their
    mean to a target; every row a caption uses gets a gradient. loss(table) -> a scalar."""

    def __init__(self, ids: torch.Tensor, mix: torch.Tensor, target: torch.Tensor):
        self.ids, self.mix, self.target = ids, mix, target

    def __call__(self, table):
        return ((torch.tanh(table[self.ids] @ self.mix.to(table.dtype)).mean(0) - self.target.to(table.dtype)) ** 2).sum()

    def __repr__(self) -> str:
        return "loss(table) (a fixed toy denoising loss of the token table: differentiable in every row it uses)"


class ToyChunkNetwork:
    """A fixed stand-in for a trained policy's noise predictor: model(x_t, t, y) = tanh(w x_t + t / T + y A) for flat
    chunks x_t (B, D) and observations y (B, 2) (y=None reads as an observation of zeros)."""

    def __init__(self, w: float, T: int, a: torch.Tensor):
        self.w, self.T, self.a = w, T, a

    def __call__(self, x, t, y=None):
        cond = 0 if y is None else y.to(x.dtype) @ self.a.to(x.dtype)
        return torch.tanh(self.w * x + per_sample(t.to(x.dtype) / self.T, x) + cond)

    def __repr__(self) -> str:
        return "model(x_t, t, y) (a fixed toy noise predictor conditioned on the observation y)"
