"""The training loop: AdamW, EMA of weights, gradient clipping, mixed precision on GPU, budgets, exact resume.

One loop trains all three families of lesson 4: diffusion (one network, one optimizer), VAE (encoder and decoder
trained together on the ELBO) and GAN (a second network and optimizer: `d_steps` discriminator updates per
generator update).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from . import checkpoints as ckpt_io
from .data import (
    DIGITS_LEVELS,
    TOY_2D,
    digits_split,
    grid_of_gaussians,
    ring_of_gaussians,
)
from .gan import GAN_REGS, discriminator_loss, generator_loss, r1_penalty
from .losses import diffusion_loss
from .models import build_model
from .schedules import SCHEDULES, NoiseSchedule
from .vae import elbo

MIXTURES = {"ring8": ring_of_gaussians, "grid25": grid_of_gaussians}
DATASETS = tuple(MIXTURES) + tuple(sorted(TOY_2D)) + ("digits",)
FAMILIES = ("diffusion", "gan", "vae")
LOSS_NAMES = {"diffusion": ("loss",), "vae": ("loss", "kl"), "gan": ("d_loss", "g_loss")}


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
    family: str = "diffusion"           # diffusion | gan | vae (lesson 4); model = {"net": "mlp" | "conv", ...} for GAN/VAE
    latent: int = 8                     # GAN / VAE latent size
    betas: tuple = (0.9, 0.999)         # Adam's betas (GANs usually train with beta1 = 0.5)
    gan_reg: str = "none"               # GAN regulariser: none | spectral (spectral norm in D) | r1 (gradient penalty)
    r1_gamma: float = 1.0               # R1 weight: the D loss gets + gamma/2 * E||grad D(x_real)||^2
    d_steps: int = 1                    # discriminator updates per generator update
    beta: float = 1.0                   # VAE: weight of the KL term (beta-VAE; 1 is the true ELBO)

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
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.family != "diffusion" and self.conditional:
            raise ValueError("conditional=True is implemented for the diffusion family only")
        if self.gan_reg not in GAN_REGS:
            raise ValueError(f"gan_reg must be one of {GAN_REGS}, got {self.gan_reg!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.beta < 0 or self.r1_gamma < 0:
            raise ValueError(f"beta and r1_gamma must be >= 0, got {self.beta!r} and {self.r1_gamma!r}")
        for name in ("T", "batch_size", "steps", "latent", "d_steps"):
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
# Lesson 4's rivals. Sizes are picked so that the network that samples has about as many parameters as the diffusion
# network of the same data (2D: 215k; digits: the compact UNet of COMPARE_UNET, 177k); see compare.BUDGET.
_GAN = dict(family="gan", lr=2e-4, betas=(0.5, 0.999), warmup=0, lr_decay="constant")  # DCGAN's
_VAE = dict(family="vae", lr=1e-3, warmup=100)
for _name in MIXTURES:
    PRESETS[f"{_name}_gan"] = replace(PRESETS[_name], model={"net": "mlp", "hidden": 256, "depth": 3},
                                      **{**_GAN, "lr": 1e-3})  # on grid25, 3,000 steps: hq 0.80 vs 0.62 at 2e-4
    PRESETS[f"{_name}_vae"] = replace(PRESETS[_name], model={"net": "mlp", "hidden": 180, "depth": 3}, **_VAE)
COMPARE_UNET = {"kind": "unet", "base": 16, "mults": [1, 2], "num_res": 1}
PRESETS["digits_gan"] = replace(PRESETS["digits"], model={"net": "conv", "base": 40}, latent=32, **_GAN)
PRESETS["digits_vae"] = replace(PRESETS["digits"], model={"net": "conv", "base": 24}, latent=32, **_VAE)


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
        self.family = config.family
        self.model_config, self.disc_config = self._model_configs()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = build_model(self.model_config).to(self.device)
            self.disc = build_model(self.disc_config).to(self.device) if self.disc_config else None
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        adam = dict(lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
        self.opt = torch.optim.AdamW(self.model.parameters(), **adam)
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), **adam) if self.disc is not None else None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.amp_dtype = None
        if config.amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16) \
            if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler(enabled=self.amp_dtype == torch.float16)
        self.step, self.elapsed = 0, 0.0
        self.history = {name: [] for name in LOSS_NAMES[self.family]}

    @property
    def losses(self) -> list[float]:
        """The main loss per step: diffusion loss, VAE negative ELBO per dimension, or GAN discriminator loss."""
        return self.history[LOSS_NAMES[self.family][0]]

    def _model_configs(self) -> tuple[dict, dict | None]:
        """The sampling network's config and, for a GAN, the discriminator's."""
        c, shape = self.config, self.source.shape
        if self.family == "diffusion":
            data_keys = {"dim": shape[0]} if len(shape) == 1 else {"in_channels": shape[0]}
            return {**c.model, **data_keys, "prediction": c.prediction,
                    "num_classes": self.source.num_classes if c.conditional else None}, None
        if c.model.get("kind", "mlp") != "mlp":
            raise ValueError(f"a {c.family} takes model={{'net': 'mlp' | 'conv', ...}}, got kind {c.model['kind']!r}")
        net = {"net": "mlp", **{k: v for k, v in c.model.items() if k != "kind"}}
        data_keys = {"dim": shape[0], "in_channels": None} if len(shape) == 1 else {"dim": None, "in_channels": shape[0]}
        if (net["net"] == "mlp") != (len(shape) == 1):
            raise ValueError(f"a {c.family} on {c.data} needs model net={'mlp' if len(shape) == 1 else 'conv'}, "
                             f"got {net['net']!r}")
        if self.family == "vae":
            return {"kind": "vae", **net, **data_keys, "latent": c.latent}, None
        return ({"kind": "generator", **net, **data_keys, "latent": c.latent},
                {"kind": "discriminator", **net, **data_keys, "spectral": c.gan_reg == "spectral"})

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then constant or cosine decay to 10% of the peak at config.steps."""
        c = self.config
        warm = min(1.0, (step + 1) / c.warmup) if c.warmup > 0 else 1.0
        if c.lr_decay == "constant":
            return c.lr * warm
        progress = min(1.0, step / c.steps)
        return c.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def _update(self, opt, module, loss: torch.Tensor) -> None:
        """Backward, clip the gradient norm, step: the same update for every network of every family."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {self.step}: lower the learning rate "
                                     f"(now {self.lr_at(self.step):.2e}) or the gradient clip")
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(module.parameters(), self.config.grad_clip)
        self.scaler.step(opt)
        self.scaler.update()

    def _batch(self):
        c = self.config
        x, y = self.source.sample(c.batch_size, self.generator)
        kwargs = {}
        if c.conditional:
            drop = torch.rand(len(y), generator=self.generator) < c.label_dropout
            kwargs["y"] = torch.where(drop, torch.full_like(y, self.source.num_classes), y).to(self.device)
        return x.to(self.device), kwargs

    def _gan_step(self) -> list[torch.Tensor]:
        """d_steps discriminator updates (fresh real and fake batches), then one non-saturating generator update."""
        c = self.config
        self.disc.requires_grad_(True)
        for _ in range(c.d_steps):
            x, _ = self._batch()
            with torch.no_grad():
                fake = self.model.sample(len(x), self.generator)
            d_loss = discriminator_loss(self.disc(x), self.disc(fake))
            penalty = c.r1_gamma / 2 * r1_penalty(self.disc, x) if c.gan_reg == "r1" else 0.0
            self._update(self.opt_d, self.disc, d_loss + penalty)
        self.disc.requires_grad_(False)  # the generator's step needs gradients through D, not for D
        g_loss = generator_loss(self.disc(self.model.sample(c.batch_size, self.generator)))
        self._update(self.opt, self.model, g_loss)
        return [d_loss, g_loss]

    def train_step(self) -> torch.Tensor:
        """One optimizer step on a fresh batch; returns the logged losses (a detached tensor, LOSS_NAMES order)."""
        c = self.config
        for opt in (self.opt, self.opt_d):
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = self.lr_at(self.step)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if self.family == "gan":
                values = self._gan_step()
            else:
                x, kwargs = self._batch()
                if self.family == "vae":
                    levels = DIGITS_LEVELS if c.data == "digits" else None
                    terms = elbo(self.model, x, beta=c.beta, levels=levels, generator=self.generator)
                    values = [-terms["elbo"].mean() / x[0].numel(), terms["kl"].mean()]
                else:
                    values = [diffusion_loss(self.model, x, self.schedule, c.prediction, c.weighting, c.gamma,
                                             generator=self.generator, **kwargs)]
                self._update(self.opt, self.model, values[0])
        self.step += 1
        decay = min(c.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)
        return torch.stack([v.detach().float() for v in values])

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
        values = torch.stack(pending).cpu()  # (steps, losses): one device sync per 50 steps
        for name, column in zip(self.history, values.T.tolist()):
            self.history[name].extend(column)
        if bar is not None:
            bar.update(len(values))
            bar.set_postfix({name: f"{v:.4f}" for name, v in zip(self.history, values.mean(0).tolist())})
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
                "losses": torch.tensor(self.losses, dtype=torch.float64), "rng": rng,
                "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()},
                **({"disc_config": self.disc_config, "disc": self.disc.state_dict(), "opt_d": self.opt_d.state_dict()}
                   if self.disc is not None else {})}

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
        if self.disc is not None:
            ckpt_io.check_same_model(state.get("disc_config") or {}, self.disc_config, where="checkpoint's discriminator")
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        history = state.get("history") or {"loss": state["losses"]}  # files written before lesson 4
        self.history = {k: history[k].tolist() for k in LOSS_NAMES[self.family]}
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
