"""Flow matching as a family of the training loop: one network regressed on the velocity of straight paths (Lipman et
al. 2023, eq. 23); with a teacher, rectified flow's reflow on the teacher's own (noise, sample) pairs (Liu et al. 2023,
Algorithm 1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..flow import LOSSES, PREDICTION, TIMES, flow_matching_loss
from .base import Family


@dataclass
class FlowOptions:
    times: str = "uniform"              # how t is drawn: uniform | logit_normal | one (t = 1 only: one-step distillation)
    teacher: str | None = None          # reflow: a flow checkpoint (shipped name or path) whose ODE pairs noise with data
    pairs: int = 50_000                 # reflow: how many (noise, sample) pairs the teacher makes, once, at the start
    teacher_nfe: int = 99               # reflow: model evaluations per pair (Heun, uniform in t)
    loss: str = "mse"                   # mse | pseudo_huber (course_lib.flow.pseudo_huber; Lee et al. 2024 for reflow)
    huber_c: float = 0.01               # pseudo-Huber's c: errors below it count quadratically, above it linearly

    def __post_init__(self):
        if self.times not in TIMES:
            raise ValueError(f"times must be one of {TIMES}, got {self.times!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not isinstance(self.huber_c, (int, float)) or self.huber_c <= 0:
            raise ValueError(f"huber_c must be a number > 0, got {self.huber_c!r}")
        if self.teacher is not None and not isinstance(self.teacher, str):
            raise ValueError(f"teacher must be a checkpoint name or path, got {self.teacher!r}")
        for name in ("pairs", "teacher_nfe"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")


def load_teacher(name: str):
    """A flow checkpoint's EMA network (shipped name like 'ring8_flow', or a path), through load_pretrained."""
    from ..checkpoints import load_pretrained

    loaded = load_pretrained(name)
    if loaded.config.get("family") != "flow":
        raise ValueError(f"teacher {name!r} is a {loaded.config.get('family', 'diffusion')!r} model; reflow needs a "
                         "flow model")
    return loaded


class FlowFamily(Family):
    """Draw x0, noise and t; regress the network on noise - x0 at x_t = (1 - t) x0 + t noise (course_lib.flow).
    Reflow (a teacher given): the noise is not drawn but the teacher's partner of x0, and the network starts from the
    teacher's weights."""

    name, Options, loss_names = "flow", FlowOptions, ("loss",)

    def check(self, config) -> None:
        if config.options.times == "one" and config.options.teacher is None:
            raise ValueError("times='one' (a one-step generator) needs a teacher's coupling: without one the best "
                             "single step from independent noise is the data mean")

    def networks(self, config, shape, num_classes):
        data_keys = {"dim": shape[0]} if len(shape) == 1 else {"in_channels": shape[0]}
        return {"model": {**config.model, **data_keys, "prediction": PREDICTION}}

    def setup(self, trainer) -> None:
        trainer.schedule, trainer.pairs = None, None
        o = trainer.config.options
        if o.teacher is None:
            return
        from ..flow import reflow_pairs
        from ..samplers import as_denoiser

        teacher = load_teacher(o.teacher)
        g = torch.Generator().manual_seed(trainer.config.seed + 7919)  # the coupling's noise: fixed by the seed
        noise = torch.randn(o.pairs, *trainer.source.shape, generator=g)
        with torch.no_grad():
            x = torch.cat([reflow_pairs(as_denoiser(teacher.model), chunk, nfe=o.teacher_nfe)
                           for chunk in noise.split(10_000)])
        trainer.pairs = (x, noise)
        trainer.teacher_weights, trainer.teacher_config = teacher.model.state_dict(), teacher.model.config

    def init_networks(self, trainer) -> None:
        # reflow starts from the teacher (Liu et al. 2023, sec. 2.3) when the networks match; a different network (a
        # larger student, say) starts fresh: the pairs, not the weights, carry what the teacher knows
        if trainer.pairs is not None and trainer.teacher_config == trainer.model.config:
            trainer.model.load_state_dict(trainer.teacher_weights)

    def step(self, trainer) -> list:
        o = trainer.config.options
        if trainer.pairs is None:
            x, _ = trainer.batch()
            noise = None
        else:
            idx = torch.randint(len(trainer.pairs[0]), (trainer.config.batch_size,), generator=trainer.generator)
            x, noise = (p[idx].to(trainer.device) for p in trainer.pairs)
        loss = flow_matching_loss(trainer.model, x, noise, times=o.times, generator=trainer.generator, loss=o.loss,
                                  huber_c=o.huber_c)
        trainer.update("model", loss)
        return [loss]
