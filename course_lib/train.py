"""The training loop: AdamW, EMA of weights, gradient clipping, mixed precision on GPU, budgets, exact resume.

One loop, read top to bottom in `Trainer.train_step`: set the learning rate, let the family take its step (it draws
batches and calls `update` for each network it trains), update the EMA. What is trained lives in
course_lib.families: diffusion (lesson 2), GAN and VAE (lesson 4), each with its own config fields.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch

from . import checkpoints as ckpt_io
from .data import MIXTURES, DataSource  # noqa: F401  (MIXTURES: where the benchmarks look it up)
from .families import FAMILIES, family
from .nets import build_model
from .runtime import autocast_dtype
from .train_config import COMPARE_UNET, PRESETS, TrainConfig, preset  # noqa: F401  (the config and presets: course_lib.train_config)

LOSS_NAMES = {name: f.loss_names for name, f in FAMILIES.items()}
OPTIMIZER_KEYS = {"model": "optimizer", "disc": "opt_d"}  # a network's optimizer in a checkpoint (names kept stable)


class Trainer:
    """Trains any family from a TrainConfig; `train()` runs a budget, `save()`/`resume()` checkpoint it exactly."""

    def __init__(self, config: TrainConfig, device=None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer needs a TrainConfig (see course_lib.train.preset), got {type(config).__name__}")
        from . import distributed

        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # under torchrun: this process's rank, the number of processes, its device; (0, 1, device) otherwise
        self.rank, self.world, self.device = distributed.init(self.device)
        if self.world > 1 and config.family != "diffusion":
            raise ValueError(f"data-parallel training (torchrun) is implemented for the diffusion family, not "
                             f"{config.family!r}: run it in one process")
        self.rows = distributed.part(config.batch_size, self.rank, self.world) if self.world > 1 else None
        self.source = DataSource(config.data)
        self.family = config.family
        self.spec = family(config.family)
        self.spec.setup(self)  # e.g. diffusion's noise schedule, self.schedule (None for the other families)
        self.net_configs = self.spec.networks(config, self.source.shape, self.source.num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.nets = {role: build_model(c).to(self.device) for role, c in self.net_configs.items()}
        self.spec.init_networks(self)  # e.g. reflow starts from its teacher's weights
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        adam = dict(lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
        self.opts = {role: torch.optim.AdamW(net.parameters(), **adam) for role, net in self.nets.items()}
        self.generator = torch.Generator().manual_seed(config.seed)
        self.amp_dtype = autocast_dtype(self.device) if config.amp else None  # fp32 where None (runtime)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16) \
            if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler(enabled=self.amp_dtype == torch.float16)
        self.step, self.elapsed = 0, 0.0
        self.history = {name: [] for name in self.spec.loss_names}

    # the network that samples, its optimizer and config; a GAN's discriminator (None for the other families)
    model = property(lambda self: self.nets["model"])
    opt = property(lambda self: self.opts["model"])
    model_config = property(lambda self: self.net_configs["model"])
    disc = property(lambda self: self.nets.get("disc"))
    opt_d = property(lambda self: self.opts.get("disc"))
    disc_config = property(lambda self: self.net_configs.get("disc"))

    @property
    def losses(self) -> list[float]:
        """The main loss per step: diffusion loss, VAE negative ELBO per dimension, or GAN discriminator loss."""
        return self.history[self.spec.loss_names[0]]

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then constant or cosine decay to config.lr_floor (10% by default) of the peak at config.steps."""
        c = self.config
        warm = min(1.0, (step + 1) / c.warmup) if c.warmup > 0 else 1.0
        if c.lr_decay == "constant":
            return c.lr * warm
        progress = min(1.0, step / c.steps)
        return c.lr * warm * (c.lr_floor + (1 - c.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A fresh training batch drawn with the trainer's generator: data on the device, labels (or None) on the CPU."""
        x, y = self.source.sample(self.config.batch_size, self.generator)
        return x.to(self.device), y

    def update(self, role: str, loss: torch.Tensor) -> None:
        """Backward, clip the gradient norm, step: the same update for every network of every family."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {self.step}: lower the learning rate "
                                     f"(now {self.lr_at(self.step):.2e}) or the gradient clip")
        opt = self.opts[role]
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.world > 1:  # each rank's loss is the mean over its rows: the mean of the means is the batch's
            from .distributed import average_gradients
            average_gradients(self.nets[role].parameters(), self.world)
        self.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(self.nets[role].parameters(), self.config.grad_clip)
        self.scaler.step(opt)
        self.scaler.update()

    def train_step(self) -> torch.Tensor:
        """One step: learning rate, the family's step, EMA; returns the logged losses (detached, loss_names order)."""
        for opt in self.opts.values():
            for group in opt.param_groups:
                group["lr"] = self.lr_at(self.step)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            values = self.spec.step(self)
        self.step += 1
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)
        values = torch.stack([v.detach().float() for v in values])
        if self.world > 1:
            from .distributed import average
            values = average(values, self.world)
        return values

    def train(self, steps: int | None = None, seconds: float | None = None, progress: bool = True,
              callback=None, every: int = 500) -> Trainer:
        """Run until `steps` more steps (default: up to config.steps) or `seconds` pass; callback(self) every `every` steps."""
        if steps is not None and (not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        end = self.step + steps if steps is not None else self.config.steps
        seconds = seconds if seconds is not None else self.config.seconds
        if seconds is not None and self.world > 1:
            raise ValueError("a time budget would stop the processes at different steps: give data-parallel "
                             "training a budget in steps")
        progress = progress and self.rank == 0
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=max(end - self.step, 0), desc=f"train {self.config.data}", unit="step")
        for net in self.nets.values():
            net.train()
        start, pending = time.perf_counter(), []
        try:
            while self.step < end and (seconds is None or time.perf_counter() - start < seconds):
                pending.append(self.train_step())
                if len(pending) == 50 or self.step == end:
                    self._flush(pending, bar)
                if callback is not None and self.step % every == 0:
                    self._flush(pending, bar)
                    callback(self)
        finally:
            self._flush(pending, bar)
            self.elapsed += time.perf_counter() - start
            if bar is not None:
                bar.close()
        return self

    def _flush(self, pending: list, bar) -> None:
        if not pending:
            return
        values = torch.stack(pending).cpu()  # (steps, losses): one device sync per 50 steps
        for name, column in zip(self.history, values.T.tolist()):
            self.history[name].extend(column)
        if bar is not None:
            bar.update(len(values))
            bar.set_postfix({name: f"{v:.4f}" for name, v in zip(self.history, values.mean(0).tolist())})
        pending.clear()

    # ---- checkpoints ----------------------------------------------------------------------------

    def _network_keys(self, role: str) -> tuple[str, str, str]:
        """Where a network's weights, optimizer and config sit in a checkpoint (the names of the first files kept)."""
        if role == "model":
            return "model", "optimizer", "model_config"
        return role, OPTIMIZER_KEYS.get(role, f"opt_{role}"), f"{role}_config"

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: weights, EMA, optimizers, step, RNG states, losses, config."""
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": "train_state",
                 "config": self.config.to_dict(), "ema": self.ema.state_dict(), "scaler": self.scaler.state_dict(),
                 "step": self.step, "elapsed": self.elapsed, "rng": rng,
                 "losses": torch.tensor(self.losses, dtype=torch.float64),
                 "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()}}
        for role in self.nets:
            weights, opt, cfg = self._network_keys(role)
            state.update({weights: self.nets[role].state_dict(), opt: self.opts[role].state_dict(),
                          cfg: self.net_configs[role]})
        return state

    def save(self, path: str | Path) -> Path:
        """Write the full training state atomically (temporary file, then rename); under torchrun only rank 0
        writes (every rank holds the same state)."""
        if self.rank != 0:
            return Path(path)
        return ckpt_io.save_atomic(self.state_dict(), path)

    def load_state_dict(self, state: dict) -> None:
        for role in self.nets:
            weights, opt, cfg = self._network_keys(role)
            where = {"model": "checkpoint", "disc": "checkpoint's discriminator"}.get(role, f"checkpoint's {role}")
            ckpt_io.check_same_model(state.get(cfg) or {}, self.net_configs[role], where=where)
            self.nets[role].load_state_dict(state[weights])
            self.opts[role].load_state_dict(state[opt])
        self.ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        history = state.get("history") or {"loss": state["losses"]}  # files written before lesson 4
        self.history = {k: history[k].tolist() for k in self.spec.loss_names}
        self.generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    @classmethod
    def resume(cls, path: str | Path, device=None) -> Trainer:
        """Rebuild a Trainer from a checkpoint written by save(); training continues exactly where it stopped."""
        state = ckpt_io.load_checkpoint(path)
        if state["kind"] != "train_state":
            raise ValueError(f"{path} holds exported weights only (no optimizer state): it cannot be resumed")
        trainer = cls(TrainConfig.from_dict(state["config"]), device)
        trainer.load_state_dict(state)
        return trainer

    def export(self, path: str | Path, card: dict | None = None, half: bool = False) -> Path:
        """Write the EMA weights, config and card only (what ships in data/), atomically; rank 0 only. half=True stores
        the weights in float16 (half the file; loading casts them back to float32, as SD ships fp16 weights)."""
        if self.rank != 0:
            return Path(path)
        dtype = torch.float16 if half else None
        state = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": "weights",
                 "config": self.config.to_dict(), "model_config": self.model_config,
                 "weights": {k: v.detach().cpu().to(dtype if v.is_floating_point() else v.dtype)
                             for k, v in self.ema.state_dict().items()},
                 "step": self.step, "card": card or {}}
        return ckpt_io.save_atomic(state, path)


def smoothed(values, window: int = 100) -> list[float]:
    """Running mean over `window` values (for readable loss curves)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(losses, ax=None, window: int = 100, title: str | None = None):
    """Loss per step (faint) and its running mean, on a log scale, with labelled axes."""
    import matplotlib.pyplot as plt

    ax = ax if ax is not None else plt.subplots(figsize=(5, 3))[1]
    shown = max(1, min(window, len(losses := list(losses))))  # a run shorter than the window: the mean of all of it
    ax.plot(losses, color="tab:blue", alpha=0.25, lw=0.5, label="per step")
    ax.plot(smoothed(losses, window), color="tab:blue", lw=1.5, label=f"mean of {shown}")
    ax.set(yscale="log", xlabel="optimizer step", ylabel="training loss", title=title)
    ax.legend(frameon=False)
    return ax


def __getattr__(name: str):
    """sample_quality and held_out_likelihood lived here in earlier releases; they are in course_lib.evaluate now."""
    if name in ("sample_quality", "held_out_likelihood"):
        from . import evaluate
        from ._moved import moved_warning

        moved_warning(f"course_lib.train.{name}", f"course_lib.evaluate.{name}")
        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
