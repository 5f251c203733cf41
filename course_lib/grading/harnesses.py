"""Procedures that run a learner's function where the learner's code runs (the notebook, or the grader's worker).

The training exercises need a loop around the learner's step: a fresh small network, an optimizer, batches of the
task's data. That loop is all that runs here; it returns plain tensors (the losses and the trained weights), and the
verdict is made from them elsewhere (course_lib.exercises, in the grading parent), which loads the weights into a
network of its own and scores them on data the worker never saw. Each procedure is a few seconds on a laptop CPU.
"""
from __future__ import annotations

import torch

from .tasks import BATCH, T_TRAIN, TRAIN_STEPS


def denoiser_net(seed: int):
    """The small noise-prediction network the training-step exercise trains (the same one each time for a seed)."""
    from ..nets import TimeMLP

    torch.manual_seed(seed)
    return TimeMLP(dim=2, hidden=128, depth=3, temb_dim=32)


def vae_net(seed: int):
    """The small VAE the VAE-step exercise trains."""
    from ..nets import VAE

    torch.manual_seed(seed)
    return VAE(net="mlp", latent=2, dim=2, hidden=64, depth=2)


def train_alpha_bar() -> torch.Tensor:
    """The training-step exercise's alpha-bar: a cosine schedule of T_TRAIN steps, float32."""
    from ..schedules import NoiseSchedule

    return NoiseSchedule.named("cosine", T_TRAIN).alpha_bar.float().clone()


def _as_loss(value, step: int) -> float:
    """The loss the learner's step returned, as a float, or a clear error."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"your step returned a tensor of shape {tuple(value.shape)} at step {step}; return the "
                            "batch's loss, a single number (a 0-d tensor or loss.item())")
        return float(value.detach())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"your step returned {type(value).__name__} at step {step}; return the batch's loss (a number)")


def _train(fn, model, data: torch.Tensor, seed: int, steps: int, extra: tuple) -> dict:
    """Call fn(model, optimizer, x0, *extra) on `steps` batches drawn from `data`; the losses and the final weights."""
    if not isinstance(data, torch.Tensor) or data.ndim != 2:
        raise TypeError("the training data must be a tensor of points")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    torch.manual_seed(seed + 2)  # the learner's own torch.randn / randint calls are reproducible too
    model.train()
    for step in range(steps):
        batch = data[torch.randint(len(data), (BATCH,), generator=gen)]
        losses.append(_as_loss(fn(model, optimizer, batch, *extra), step))
    out = {"losses": torch.tensor(losses, dtype=torch.float64)}
    out.update({f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


def train_diffusion(fn, seed: int, data: torch.Tensor, steps: int = TRAIN_STEPS) -> dict:
    """Lesson 2: train the small denoiser with the learner's train_step(model, optimizer, x0, alpha_bar)."""
    return _train(fn, denoiser_net(seed), data, seed, steps, (train_alpha_bar(),))


def train_vae(fn, seed: int, data: torch.Tensor, steps: int = TRAIN_STEPS) -> dict:
    """Lesson 4: train the small VAE with the learner's vae_step(vae, optimizer, x)."""
    return _train(fn, vae_net(seed), data, seed, steps, ())


PROCEDURES = {"train_diffusion": train_diffusion, "train_vae": train_vae}
