"""The training loop: AdamW, EMA of weights, gradient clipping, mixed precision on GPU, budgets, exact resume.

One loop, read top to bottom in `Trainer.train_step`: set the learning rate, let the family take its step (it draws
batches and calls `update` for each network it trains), update the EMA. What is trained lives in
course_lib.families: diffusion (lesson 2), GAN and VAE (lesson 4), each with its own config fields.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch

from . import checkpoints as ckpt_io
from .data import DATASETS, MIXTURES, DataSource  # noqa: F401  (MIXTURES: where the benchmarks look it up)
from .families import FAMILIES, family
from .nets import build_model
from .runtime import autocast_dtype

LOSS_NAMES = {name: f.loss_names for name, f in FAMILIES.items()}
OPTIMIZER_KEYS = {"model": "optimizer", "disc": "opt_d"}  # a network's optimizer in a checkpoint (names kept stable)


@dataclass(init=False)
class TrainConfig:
    """The loop's fields, plus `options`: the family's own fields (course_lib.families, e.g. DiffusionOptions).

    Build it flat, `TrainConfig(data="digits", family="diffusion", prediction="v")`: each keyword that is not the
    loop's goes to the family's options, and one that neither knows is refused. Read it flat too (`config.prediction`).
    """

    data: str = "ring8"                 # ring8 | grid25 | any 2D toy name | digits
    model: dict = field(default_factory=lambda: {"kind": "mlp", "hidden": 256, "depth": 3})
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100                   # steps of linear learning-rate warm-up
    lr_decay: str = "cosine"            # cosine (to lr_floor x lr at `steps`) | constant
    lr_floor: float = 0.1               # where the cosine decay ends, as a fraction of lr
    grad_clip: float = 1.0              # max gradient norm
    ema_decay: float = 0.999
    steps: int = 10_000                 # the budget in optimizer steps ...
    seconds: float | None = None        # ... and optionally in wall-clock seconds (whichever ends first)
    seed: int = 0
    amp: bool = True                    # autocast where it pays: runtime.autocast_dtype (GPU; CPU with native bf16)
    betas: tuple = (0.9, 0.999)         # Adam's betas (GANs usually train with beta1 = 0.5)
    family: str = "diffusion"           # diffusion | gan | vae: what is trained (course_lib.families)
    options: object = None              # the family's own fields (filled from the keywords the loop does not take)

    def __init__(self, **kwargs):
        spec = family(kwargs.get("family", "diffusion"))
        options = kwargs.pop("options", None)
        for f in fields(self):
            if f.name != "options":
                default = f.default_factory() if f.default_factory is not MISSING else f.default
                object.__setattr__(self, f.name, kwargs.pop(f.name, default))
        own = {}
        if isinstance(options, dict):
            own = dict(options)
        elif is_dataclass(options):  # another family's options (replace(..., family=...)) keep only shared fields
            own = {k: v for k, v in asdict(options).items() if type(options) is spec.Options or k in spec.field_names()}
        elif options is not None:
            raise TypeError(f"options must be a dict or a {spec.Options.__name__}, got {type(options).__name__}")
        unknown = sorted((set(kwargs) | set(own)) - set(spec.field_names()))
        elsewhere = {n: [f.name for f in FAMILIES.values() if n in f.field_names()] for n in unknown}
        if any(elsewhere.values()):  # a field, but of another family: a wrong value of `family`, or of the field
            n, owners = next((n, o) for n, o in elsewhere.items() if o)
            raise ValueError(f"{n!r} is a field of the {' and '.join(owners)} family, not of {spec.name!r}: it is "
                             f"implemented for the {' and '.join(owners)} family only (the {spec.name} family's fields: "
                             f"{', '.join(spec.field_names())})")
        if unknown:
            loop = [f.name for f in fields(self) if f.name != "options"]
            raise TypeError(f"{unknown}: not a field of the training loop ({', '.join(loop)}) nor of any family "
                            f"(the {spec.name} family's: {', '.join(spec.field_names())})")
        object.__setattr__(self, "options", spec.Options(**{**own, **kwargs}))
        self._check()
        spec.check(self)

    def _check(self) -> None:
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {DATASETS}, got {self.data!r}")
        if self.lr_decay not in ("cosine", "constant"):
            raise ValueError(f"lr_decay must be 'cosine' or 'constant', got {self.lr_decay!r}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a dict (a network's config), got {self.model!r}")
        self.model = dict(self.model)
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("batch_size", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not 0 <= self.ema_decay < 1 or self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("need 0 <= ema_decay < 1, lr > 0 and grad_clip > 0")
        if not 0 <= self.lr_floor <= 1:
            raise ValueError(f"lr_floor is a fraction of lr, in [0, 1]; got {self.lr_floor!r}")

    def __getattr__(self, name):  # only for names that are not the loop's: the family's fields, read flat
        options = self.__dict__.get("options")
        if options is not None and name in {f.name for f in fields(options)}:
            return getattr(options, name)
        raise AttributeError(f"TrainConfig (family {self.__dict__.get('family')!r}) has no field {name!r}")

    def __setattr__(self, name, value):
        options = self.__dict__.get("options")
        if options is not None and name in {f.name for f in fields(options)}:
            setattr(options, name, value)
        else:
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        """The loop's and the family's fields in one flat dict (what checkpoints store)."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        return copy.deepcopy({**flat, **asdict(self.options)})

    @classmethod
    def from_dict(cls, flat: dict) -> TrainConfig:
        """Rebuild from to_dict(); files written before the families were split carry every family's fields, and the
        ones that are not this family's are dropped."""
        spec = family(flat.get("family", "diffusion"))
        known = {f.name for f in fields(cls)} | set(spec.field_names())
        return cls(**{k: v for k, v in flat.items() if k in known and k != "options"})


PRESETS = {
    "ring8": TrainConfig(data="ring8", steps=12_000),
    "grid25": TrainConfig(data="grid25", steps=30_000),  # 25 modes need longer than 8: 12,000 steps gave 0.78 hq
    "digits": TrainConfig(data="digits", model={"kind": "unet", "base": 32, "mults": [1, 2], "num_res": 1},
                          schedule="cosine", batch_size=128, lr=1e-3, steps=4_000),
}
PRESETS["digits_cond"] = replace(PRESETS["digits"], conditional=True)
# Lesson 4's rivals. Sizes are picked so that the network that samples has about as many parameters as the diffusion
# network of the same data (2D: 215k; digits: the compact UNet of COMPARE_UNET, 177k); see bench.compare.BUDGET.
_GAN = dict(family="gan", lr=2e-4, betas=(0.5, 0.999), warmup=0, lr_decay="constant")  # DCGAN's
_VAE = dict(family="vae", lr=1e-3, warmup=100)
for _name in MIXTURES:
    PRESETS[f"{_name}_gan"] = replace(PRESETS[_name], model={"net": "mlp", "hidden": 256, "depth": 3},
                                      **{**_GAN, "lr": 1e-3})  # on grid25, 3,000 steps: hq 0.80 vs 0.62 at 2e-4
    PRESETS[f"{_name}_vae"] = replace(PRESETS[_name], model={"net": "mlp", "hidden": 180, "depth": 3}, **_VAE)
COMPARE_UNET = {"kind": "unet", "base": 16, "mults": [1, 2], "num_res": 1}
PRESETS["digits_gan"] = replace(PRESETS["digits"], model={"net": "conv", "base": 40}, latent=32, **_GAN)
PRESETS["digits_vae"] = replace(PRESETS["digits"], model={"net": "conv", "base": 24}, latent=32, **_VAE)
# Lesson 6's 2D guidance model: ring8 with its mode as the label. With 10% label dropout and 6,000 steps the
# conditional model was fine (hq 0.985) but its unconditional half poor (hq 0.53); 20% and ring8's 12,000 steps: 0.95
PRESETS["ring8_cond"] = replace(PRESETS["ring8"], conditional=True, label_dropout=0.2)
# Lesson 6: the noise-aware classifier that guides the unconditional digits model (same schedule as PRESETS["digits"])
PRESETS["digits_noisy_classifier"] = TrainConfig(data="digits", family="classifier", schedule="cosine", batch_size=128,
                                                 model={"kind": "noisy_classifier", "base": 32}, lr=1e-3, steps=4_000)
# Lesson 9: flow matching with each diffusion preset's network, loop and budget; reflow from the shipped flow model
for _name in MIXTURES:
    PRESETS[f"{_name}_flow"] = replace(PRESETS[_name], family="flow")
    # reflow: pseudo-Huber (Lee et al. 2024), a long run ending at 1% of the learning rate. ring8, Euler uniform in t,
    # hq at 1 / 2 NFE (3 seeds x 5,000 points), pairs solved accurately (Heun in t): squared error,
    # 12,000 steps 0.92 / 0.93; pseudo-Huber, 12,000 0.90 / 0.91; squared error, 36,000 (lr to 1%) 0.945 / 0.947; this
    # preset 0.952 / 0.953. On the earlier pairs (Heun in sigma: teacher hq 0.90, not 0.97) this preset gave 0.87 / 0.88
    PRESETS[f"{_name}_reflow"] = replace(PRESETS[f"{_name}_flow"], teacher=f"{_name}_flow", loss="pseudo_huber",
                                         lr_floor=0.01, steps=72_000)
    # one-step distillation (Liu et al. 2023, sec. 2.3) of the flow's own ODE coupling: trained at t = 1 only. ring8,
    # 1 NFE: hq 0.96 on accurate pairs (0.80 on the earlier pairs made with Heun in sigma; 3 seeds x 5,000 points)
    PRESETS[f"{_name}_distilled"] = replace(PRESETS[f"{_name}_flow"], teacher=f"{_name}_flow", times="one")
PRESETS["digits_flow"] = replace(PRESETS["digits"], family="flow")
PRESETS["ring8_edm"] = replace(PRESETS["ring8"], family="edm", sigma_data=0.71)  # lesson 11 (ring8's std: 0.709)
# Lesson 10: masked diffusion and the autoregressive baseline: one transformer size, data, batch, steps and lr
PRESETS["captions_mdlm"] = TrainConfig(data="captions", family="masked_diffusion", batch_size=256, lr=1e-3,
                                       model={"kind": "token_transformer", "dim": 64, "depth": 4, "heads": 4},
                                       steps=6_000)
PRESETS["captions_ar"] = replace(PRESETS["captions_mdlm"], family="autoregressive")


def preset(name: str, **overrides) -> TrainConfig:
    """A copy of a named preset, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(copy.deepcopy(PRESETS[name]), **overrides)


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

    def export(self, path: str | Path, card: dict | None = None) -> Path:
        """Write the EMA weights, config and card only (what ships in data/), atomically; rank 0 only."""
        if self.rank != 0:
            return Path(path)
        state = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": "weights",
                 "config": self.config.to_dict(), "model_config": self.model_config,
                 "weights": {k: v.detach().cpu() for k, v in self.ema.state_dict().items()},
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
