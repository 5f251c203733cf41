"""The training loop: AdamW, EMA of weights, gradient clipping, mixed precision on GPU, budgets, exact resume."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from . import checkpoints as ckpt_io
from .data import TOY_2D, digits_split, grid_of_gaussians, ring_of_gaussians
from .losses import diffusion_loss
from .models import build_model
from .schedules import SCHEDULES, NoiseSchedule

MIXTURES = {"ring8": ring_of_gaussians, "grid25": grid_of_gaussians}
DATASETS = tuple(MIXTURES) + tuple(sorted(TOY_2D)) + ("digits",)


@dataclass
class TrainConfig:
    data: str = "ring8"                 # ring8 | grid25 | any 2D toy name | digits
    model: dict = field(default_factory=lambda: {"kind": "mlp", "hidden": 256, "depth": 3})
    schedule: str = "linear"            # noise schedule name (course_lib.schedules)
    T: int = 1000                       # number of diffusion steps
    prediction: str = "eps"             # what the network outputs: eps | x0 | v
    weighting: str = "uniform"          # loss weighting: uniform | min_snr
    gamma: float = 5.0                  # min-SNR-gamma clip
    conditional: bool = False           # feed class labels (digits only)
    label_dropout: float = 0.1          # share of labels replaced by 'no label' (for guidance later)
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100                   # steps of linear learning-rate warm-up
    lr_decay: str = "cosine"            # cosine (to 10% at `steps`) | constant
    grad_clip: float = 1.0              # max gradient norm
    ema_decay: float = 0.999
    steps: int = 10_000                 # the budget in optimizer steps ...
    seconds: float | None = None        # ... and optionally in wall-clock seconds (whichever ends first)
    seed: int = 0
    amp: bool = True                    # bfloat16/float16 autocast, used on CUDA only

    def __post_init__(self):
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {DATASETS}, got {self.data!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.prediction not in ("eps", "x0", "v"):
            raise ValueError(f"prediction must be 'eps', 'x0' or 'v', got {self.prediction!r}")
        if self.lr_decay not in ("cosine", "constant"):
            raise ValueError(f"lr_decay must be 'cosine' or 'constant', got {self.lr_decay!r}")
        if self.conditional and self.data != "digits":
            raise ValueError("conditional=True needs labelled data (data='digits')")
        for name in ("T", "batch_size", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not 0 <= self.ema_decay < 1 or not 0 <= self.label_dropout < 1 or self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("need 0 <= ema_decay < 1, 0 <= label_dropout < 1, lr > 0 and grad_clip > 0")
        self.model = dict(self.model)


PRESETS = {
    "ring8": TrainConfig(data="ring8", steps=12_000),
    "grid25": TrainConfig(data="grid25", steps=30_000),  # 25 modes need longer than 8: 12,000 steps gave 0.78 hq
    "digits": TrainConfig(data="digits", model={"kind": "unet", "base": 32, "mults": [1, 2], "num_res": 1},
                          schedule="cosine", batch_size=128, lr=1e-3, steps=4_000),
}
PRESETS["digits_cond"] = replace(PRESETS["digits"], conditional=True)


def preset(name: str, **overrides) -> TrainConfig:
    """A copy of a named preset, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(copy.deepcopy(PRESETS[name]), **overrides)


class DataSource:
    """Batches of training data drawn with the trainer's generator: fresh points for 2D, resampled images for digits."""

    def __init__(self, name: str):
        self.name = name
        self.num_classes = None
        if name in MIXTURES:
            self.mixture = MIXTURES[name]()
        if name == "digits":
            self.images, self.labels = digits_split("train")
            self.num_classes = 10

    @property
    def shape(self) -> tuple:
        return tuple(self.images.shape[1:]) if self.name == "digits" else (2,)

    def sample(self, n: int, generator: torch.Generator):
        if self.name == "digits":
            idx = torch.randint(len(self.images), (n,), generator=generator)
            return self.images[idx], self.labels[idx]
        if self.name in MIXTURES:
            return self.mixture.sample(n, generator), None
        return TOY_2D[self.name](n, generator=generator).float(), None


class Trainer:
    """Trains a diffusion model from a TrainConfig; `train()` runs a budget, `save()`/`resume()` checkpoint it."""

    def __init__(self, config: TrainConfig, device=None):
        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.source = DataSource(config.data)
        self.schedule = NoiseSchedule.named(config.schedule, config.T)
        shape = self.source.shape
        data_keys = {"dim": shape[0]} if len(shape) == 1 else {"in_channels": shape[0]}
        self.model_config = {**config.model, **data_keys, "prediction": config.prediction,
                             "num_classes": self.source.num_classes if config.conditional else None}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = build_model(self.model_config).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.amp_dtype = None
        if config.amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16) \
            if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler(enabled=self.amp_dtype == torch.float16)
        self.step, self.elapsed, self.losses = 0, 0.0, []

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then constant or cosine decay to 10% of the peak at config.steps."""
        c = self.config
        warm = min(1.0, (step + 1) / c.warmup) if c.warmup > 0 else 1.0
        if c.lr_decay == "constant":
            return c.lr * warm
        progress = min(1.0, step / c.steps)
        return c.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def train_step(self) -> torch.Tensor:
        """One optimizer step on a fresh batch; returns the loss (a detached tensor)."""
        c = self.config
        x, y = self.source.sample(c.batch_size, self.generator)
        kwargs = {}
        if c.conditional:
            drop = torch.rand(len(y), generator=self.generator) < c.label_dropout
            kwargs["y"] = torch.where(drop, torch.full_like(y, self.source.num_classes), y).to(self.device)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = diffusion_loss(self.model, x.to(self.device), self.schedule, c.prediction, c.weighting,
                                  c.gamma, generator=self.generator, **kwargs)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {self.step}: lower the learning rate "
                                     f"(now {self.lr_at(self.step):.2e}) or the gradient clip")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step += 1
        decay = min(c.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)
        return loss.detach()

    def train(self, steps: int | None = None, seconds: float | None = None, progress: bool = True,
              callback=None, every: int = 500) -> Trainer:
        """Run until `steps` more steps (default: up to config.steps) or `seconds` pass; callback(self) every `every` steps."""
        if steps is not None and (not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        end = self.step + steps if steps is not None else self.config.steps
        seconds = seconds if seconds is not None else self.config.seconds
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=max(end - self.step, 0), desc=f"train {self.config.data}", unit="step")
        self.model.train()
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
        values = torch.stack(pending).float().cpu().tolist()  # one device sync per 50 steps
        self.losses.extend(values)
        if bar is not None:
            bar.update(len(values))
            bar.set_postfix(loss=f"{sum(values) / len(values):.4f}")
        pending.clear()

    # ---- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: weights, EMA, optimizer, step, RNG states, losses, config."""
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": "train_state",
                "config": asdict(self.config), "model_config": self.model_config,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "elapsed": self.elapsed,
                "losses": torch.tensor(self.losses, dtype=torch.float64), "rng": rng}

    def save(self, path: str | Path) -> Path:
        """Write the full training state atomically (temporary file, then rename)."""
        return ckpt_io.save_atomic(self.state_dict(), path)

    def load_state_dict(self, state: dict) -> None:
        ckpt_io.check_same_model(state["model_config"], self.model_config)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.losses = state["losses"].tolist()
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
        known = {f.name for f in fields(TrainConfig)}
        trainer = cls(TrainConfig(**{k: v for k, v in state["config"].items() if k in known}), device)
        trainer.load_state_dict(state)
        return trainer

    def export(self, path: str | Path, card: dict | None = None) -> Path:
        """Write the EMA weights, config and card only (what ships in data/), atomically."""
        state = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": "weights",
                 "config": asdict(self.config), "model_config": self.model_config,
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

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses, color="tab:blue", alpha=0.25, lw=0.5, label="per step")
    ax.plot(smoothed(list(losses), window), color="tab:blue", lw=1.5, label=f"mean of {window}")
    ax.set(yscale="log", xlabel="optimizer step", ylabel="training loss", title=title)
    ax.legend(frameon=False)
    return ax


# ---- measuring a trained model (for the checkpoint cards and the tests) ---------------------------------


def _device_of(model) -> torch.device:
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def sample_quality(model, schedule: NoiseSchedule, config: dict, n: int = 2000, steps: int | None = None,
                   seed: int = 0, classifier=None, progress: bool = False, return_samples: bool = False) -> dict:
    """DDPM-sample n points/images with `steps` respaced steps (all T by default) and score them.

    2D mixtures: high-quality fraction and modes covered. Digits: the shipped classifier's mean confidence and
    its class histogram's largest gap to uniform (for a class-conditional model, labels cycle 0..9 and the
    share classified as the requested label is reported too). With return_samples, out["samples"] holds them.
    """
    from .metrics import hq_fraction, modes_covered
    from .samplers import sample_ddpm, uniform_timesteps

    g = torch.Generator().manual_seed(seed)
    device = _device_of(model)
    ts = uniform_timesteps(schedule, steps) if steps else None
    data = config["data"]
    start = time.perf_counter()
    if data == "digits":
        kwargs = {"y": (torch.arange(n) % 10).to(device)} if config.get("conditional") else {}
        x = torch.randn(n, 1, 8, 8, generator=g).to(device)
        x = sample_ddpm(model, x, schedule, ts, clip=1.0, generator=g, progress=progress, **kwargs).cpu()
        from .classifier import judge, load_classifier

        clf = classifier or load_classifier()
        out = judge(clf, x)
        if kwargs:
            out["label_accuracy"] = (clf(x).argmax(1) == kwargs["y"].cpu()).float().mean().item()
    else:
        x = sample_ddpm(model, torch.randn(n, 2, generator=g).to(device), schedule, ts, generator=g,
                        progress=progress).cpu()
        out = {}
        if data in MIXTURES:
            mixture = MIXTURES[data]()
            out = {"hq_fraction": hq_fraction(x, mixture), "modes_covered": modes_covered(x, mixture),
                   "modes": len(mixture.modes)}
    out.update(samples=n, sampler=f"DDPM ancestral, {len(ts) if ts else schedule.T} steps",
               sample_seconds=round(time.perf_counter() - start, 2))
    if return_samples:
        out["samples"] = x
    return out


@torch.no_grad()
def held_out_likelihood(model, schedule: NoiseSchedule, config: dict, n: int = 2000, n_t: int | None = None,
                        seed: int = 1) -> dict:
    """The variational bound on held-out data: nats per point for 2D, bits per dimension for digits."""
    from .data import DIGITS_LEVELS
    from .losses import variational_bound

    g = torch.Generator().manual_seed(seed)
    device = _device_of(model)
    if config["data"] == "digits":
        x = digits_split("test")[0].to(device)
        levels, key, unit = DIGITS_LEVELS, "bits_per_dim", "bits/dim"
    else:
        x = DataSource(config["data"]).sample(n, g)[0].to(device)
        levels, key, unit = None, "total", "nats per point"
    out = {"unit": unit, "data": f"{len(x)} held-out {'test images' if levels else 'fresh points'}",
           "timesteps": "all" if n_t is None else f"{n_t} random per sample"}
    for variance in ("beta", "posterior"):
        vals = variational_bound(model, x, schedule, variance=variance, levels=levels, n_t=n_t, generator=g)[key]
        out[f"nll_bound_{variance}"] = round(vals.mean().item(), 4)
        out[f"nll_bound_{variance}_stderr"] = round(vals.std().item() / math.sqrt(len(vals)), 4)
    return out
