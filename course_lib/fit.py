"""A minimal training loop for the lesson-7 models (AdamW, linear warm-up then cosine decay to 10%, optional EMA,
a progress bar): each model's module supplies only its loss on a batch index."""
from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn


def fit(model: nn.Module, loss_fn, steps: int, lr: float = 1e-3, warmup: int = 100, weight_decay: float = 0.0,
        ema: float | None = None, desc: str = "train", progress: bool = True, log_every: int = 50,
        params=None, callback=None, every: int = 0) -> tuple[nn.Module, dict]:
    """Run `steps` optimizer steps of loss_fn(step) -> scalar loss (or (loss, logged dict)); returns (the trained
    model or its EMA copy in eval mode, {'losses': [...], 'seconds': wall time, ...the last logged values}).
    `callback(step, model, seconds)` runs every `every` steps on the EMA copy (or the model); its time is not counted."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    shadow = copy.deepcopy(model).eval().requires_grad_(False) if ema else None
    losses, logged = [], {}
    it = range(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        it = bar = tqdm(it, desc=desc, unit="step")
    start = time.perf_counter()
    model.train()
    for step in it:
        scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
        scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        out = loss_fn(step)
        loss, extra = out if isinstance(out, tuple) else (out, {})
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: the loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if shadow is not None:
            with torch.no_grad():
                for s, p in zip(shadow.parameters(), model.parameters()):
                    s.lerp_(p, 1 - ema)
        losses.append(loss.item())
        if extra:
            logged = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in extra.items()}
        if callback is not None and every and (step + 1) % every == 0 and step + 1 < steps:
            pause = time.perf_counter()
            callback(step + 1, shadow if shadow is not None else model.eval(), pause - start)
            model.train()
            start += time.perf_counter() - pause
        if bar is not None and step % log_every == 0:
            bar.set_postfix(loss=f"{sum(losses[-log_every:]) / len(losses[-log_every:]):.4f}")
    model.eval()
    result = shadow if shadow is not None else model
    if shadow is not None:  # buffers (none in these models today) follow the live model
        for s, b in zip(shadow.buffers(), model.buffers()):
            s.copy_(b)
    return result.requires_grad_(False), {"losses": losses, "seconds": time.perf_counter() - start, **logged}
