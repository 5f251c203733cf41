"""Hugging Face Diffusers models through the course's sampler interface: a diffusers `UNet2DModel`,
`UNet2DConditionModel` (Stable Diffusion's) or `DiTTransformer2DModel` with its scheduler becomes a course model
`model(x_t, t, y=None, context=None, mask=None)` and a NoiseSchedule, so lesson 3's samplers and lesson 6's guidance
run on it unchanged. diffusers is imported only by the caller: this module needs nothing but the objects it is given."""
from __future__ import annotations

import torch
from torch import nn

from .schedules import NoiseSchedule

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers' prediction_type -> ours


def schedule_from_scheduler(scheduler) -> NoiseSchedule:
    """The discrete schedule a diffusers scheduler was configured with (its `betas`), as a NoiseSchedule."""
    betas = getattr(scheduler, "betas", None)
    if betas is None:
        raise TypeError(f"{type(scheduler).__name__} has no `betas`: pass a discrete-time diffusers scheduler "
                        "(DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, ...)")
    return NoiseSchedule(torch.as_tensor(betas, dtype=torch.float64), name=f"diffusers {type(scheduler).__name__}")


class DiffusersModel(nn.Module):
    """A diffusers network seen as a course denoiser network: model(x_t, t, y=None, context=None, mask=None).

    y goes to `class_labels`, context / mask to `encoder_hidden_states` / `encoder_attention_mask` (SD's UNet); an
    output with twice the input's channels (a learned variance, as DiT-XL/2 has) is cut to its first half."""

    def __init__(self, net: nn.Module, prediction: str):
        super().__init__()
        if prediction not in PREDICTIONS.values():
            raise ValueError(f"prediction must be one of {sorted(PREDICTIONS.values())}, got {prediction!r}")
        self.net, self.prediction = net, prediction
        self.config = {"kind": "diffusers", "class": type(net).__name__, "prediction": prediction}

    def forward(self, x: torch.Tensor, t, y=None, context=None, mask=None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        kwargs = {}
        if y is not None:
            kwargs["class_labels"] = torch.as_tensor(y, device=x.device).long()
        if context is not None:
            kwargs["encoder_hidden_states"] = context
            if mask is not None:
                kwargs["encoder_attention_mask"] = mask.to(x.dtype)
        name = type(self.net).__name__
        if name == "UNet2DConditionModel" and context is None:
            raise ValueError("a UNet2DConditionModel needs context= (the text encoder's states; the empty prompt's "
                             "for the unconditional prediction)")
        out = self.net(x, t, **kwargs, return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        if out.shape != x.shape:
            raise ValueError(f"{name} returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}")
        return out


def from_diffusers(net: nn.Module, scheduler) -> tuple[DiffusersModel, NoiseSchedule]:
    """(model, schedule) for `samplers.sample(model, noise, schedule, ...)` from a diffusers network and scheduler;
    the prediction type is the scheduler's `prediction_type` (epsilon, v_prediction or sample)."""
    kind = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if kind not in PREDICTIONS:
        raise ValueError(f"unsupported prediction_type {kind!r}; the course knows {sorted(PREDICTIONS)}")
    return DiffusersModel(net, PREDICTIONS[kind]).eval(), schedule_from_scheduler(scheduler)
