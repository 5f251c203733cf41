"""What a family gives the training loop: its options (config fields), its networks, its step."""
from __future__ import annotations

from dataclasses import fields


class Family:
    """A family of generative models as the training loop sees it (subclass it; see diffusion.py for the shortest).

    - `Options`: a dataclass of the family's own config fields, validated in its __post_init__;
    - `loss_names`: what `step` returns, in order (the first is the loss the progress bar and `Trainer.losses` show);
    - `networks(config, shape, num_classes)`: role -> model config for course_lib.nets.build_model. Role "model" is
      the network that samples (the loop keeps its EMA); every other role (a GAN's "disc") gets its own optimizer;
    - `setup(trainer)`: anything the step needs besides networks (diffusion's noise schedule);
    - `init_networks(trainer)`: change the freshly built networks before training starts (reflow starts from a teacher);
    - `step(trainer)`: one training step: draw batches with `trainer.batch()`, compute the losses, call
      `trainer.update(role, loss)` for each network it trains; returns the logged losses (tensors).
    """

    name: str = ""
    Options: type = None
    loss_names: tuple = ("loss",)

    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.Options))

    def check(self, config) -> None:
        """Checks that need the loop's fields too (the data, the model dict); raise ValueError."""

    def networks(self, config, shape: tuple, num_classes: int | None) -> dict[str, dict]:
        raise NotImplementedError

    def setup(self, trainer) -> None:
        trainer.schedule = None

    def init_networks(self, trainer) -> None:
        """Called once the networks are built, before the EMA copy (a resumed run then loads its own weights)."""

    def step(self, trainer) -> list:
        raise NotImplementedError


def plain_net(config, shape: tuple) -> tuple[dict, dict]:
    """A GAN's or VAE's `model` dict ({'net': 'mlp' | 'conv', ...}) and the data keys its networks need."""
    c = config
    if c.model.get("kind", "mlp") != "mlp":
        raise ValueError(f"a {c.family} takes model={{'net': 'mlp' | 'conv', ...}}, got kind {c.model['kind']!r}")
    net = {"net": "mlp", **{k: v for k, v in c.model.items() if k != "kind"}}
    data_keys = {"dim": shape[0], "in_channels": None} if len(shape) == 1 else {"dim": None, "in_channels": shape[0]}
    if (net["net"] == "mlp") != (len(shape) == 1):
        raise ValueError(f"a {c.family} on {c.data} needs model net={'mlp' if len(shape) == 1 else 'conv'}, "
                         f"got {net['net']!r}")
    return net, data_keys
