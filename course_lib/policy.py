"""Policies from trained networks (lesson 15): a diffusion policy samples an action chunk given the observation (Chi et
al. 2023, Diffusion Policy, sec. 3: DDPM on chunks, sampled with a few DDIM steps), a regression policy predicts it
in one call. Both are callables positions (B, 2) -> chunks (B, CHUNK, 2) in the task's units, for reaching.rollout."""
from __future__ import annotations

import torch

from .families.regression import regress
from .reaching import chunks_from

POLICY_SAMPLER = "ddim"  # Chi et al. sample with DDIM, 10 steps of a 100-step DDPM (sec. 4) ...
POLICY_STEPS = 10
POLICY_SPACING = "trailing"  # ... its levels from the last timestep down (Lin et al. 2024) ...
POLICY_CLIP = 1.0  # ... the denoised chunk clipped to the data's range [-1, 1] (diffusers' clip_sample, which they use)


class DiffusionPolicy:
    """Sample one chunk per observation with the course's samplers (`samplers.sample`), from fresh noise each call."""

    def __init__(self, model, schedule, steps: int = POLICY_STEPS, sampler: str = POLICY_SAMPLER,
                 spacing: str = POLICY_SPACING, clip: float | None = POLICY_CLIP,
                 generator: torch.Generator | None = None):
        if model.config.get("cond_dim") is None:
            raise ValueError("a diffusion policy needs a model conditioned on the observation (cond_dim); train one "
                             "with preset('reaching_diffusion')")
        self.model, self.schedule, self.steps, self.sampler = model.eval(), schedule, steps, sampler
        self.spacing, self.clip = spacing, clip
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.calls = 0  # network evaluations so far

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        from .samplers import sample

        positions = _positions(positions)
        noise = torch.randn(len(positions), self.model.config["dim"], generator=self.generator)
        with torch.no_grad():
            out = sample(self.model, noise, self.schedule, self.sampler, steps=self.steps, spacing=self.spacing,
                         clip=self.clip, model_kwargs={"y": positions})
        self.calls += out.nfe
        return chunks_from(out.x)


class RegressionPolicy:
    """The chunk a regression network predicts from the observation (one network call, no noise)."""

    def __init__(self, model):
        if model.config.get("cond_dim") is None:
            raise ValueError("a regression policy needs a model conditioned on the observation (cond_dim); train one "
                             "with preset('reaching_regression')")
        self.model, self.calls = model.eval(), 0

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        positions = _positions(positions)
        with torch.no_grad():
            out = regress(self.model, positions)
        self.calls += 1
        return chunks_from(out)


def _positions(positions) -> torch.Tensor:
    if not isinstance(positions, torch.Tensor) or positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"positions must be a tensor of shape (B, 2), got "
                         f"{tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__}")
    return positions.float()


def policy_from(loaded, **options):
    """The policy a trained reaching model defines: a DiffusionPolicy for a diffusion model, else a RegressionPolicy
    (`loaded`: a Trainer, or what checkpoints.load_model returns)."""
    model = loaded.ema if hasattr(loaded, "ema") else loaded.model
    family = loaded.config.family if hasattr(loaded, "config") and hasattr(loaded.config, "family") else \
        loaded.config["family"]
    if family == "regression":
        return RegressionPolicy(model)
    schedule = loaded.schedule
    return DiffusionPolicy(model, schedule, **options)
