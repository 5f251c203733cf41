"""The training loop's config (TrainConfig: the loop's fields plus the family's options) and the named presets."""
from __future__ import annotations

import copy
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace

from .data import DATASETS, MIXTURES
from .families import FAMILIES, family


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
# Lesson 14's memorisation model: the digits preset on a training set where some digits appear 10 or 100 times
PRESETS["digits_memorise"] = replace(PRESETS["digits"], data="digits_duplicated")
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
# Lesson 12's teacher: lesson 11's recipe (EDM preconditioning, weighting and log-normal levels) on the digits preset's
# network, data and budget; sigma_data 0.75 is the std of the digits pixels in [-1, 1]
PRESETS["digits_edm"] = replace(PRESETS["digits"], family="edm", sigma_data=0.75)
# Lesson 12's students of it, each starting from its weights, in float32 (a consistency loss compares two nearby
# outputs of the network: bfloat16's 3 significant digits would round the difference away). Consistency distillation
# (Song et al. 2023): N = 18 Karras intervals, Heun, target EMA 0.95, squared distance, lr 1e-4 (1e-3 diverged in the
# first hundred steps)
_FEW = dict(data="digits", model=PRESETS["digits"].model, batch_size=128, lr=1e-4, steps=3_000, amp=False)
PRESETS["digits_cd"] = TrainConfig(**_FEW, family="consistency", teacher="digits_edm")
# consistency training (no teacher evaluations) from the teacher's weights, as ECT (Geng et al. 2024) tunes one
PRESETS["digits_ct"] = TrainConfig(**_FEW, family="consistency", init="digits_edm", distance="pseudo_huber")
# consistency distillation plus a discriminator on the one-step samples (lesson 12's adversarial distillation). The
# weight, tuned on seed 99 with 1,000 steps (1-NFE FD / recall): 0 (plain CD) 22.2 / 0.935, 0.003 32.0 / 0.891, 0.01
# 35.0 / 0.892, 0.03 37.5 / 0.897 (python /tmp sweep of `Trainer(preset("digits_add", adv_weight=w, seed=99))`):
# every weight tried made it worse; the least harmful is kept, and lesson 12 says so
PRESETS["digits_add"] = TrainConfig(**_FEW, family="adversarial", teacher="digits_edm", adv_weight=0.003)
# progressive distillation (Salimans & Ho 2022): 32 -> 16 -> 8 -> 4 -> 2 -> 1 steps, 5 rounds of 1,000 steps; an EMA
# of 100 steps' length, so that the student a round ends with is that round's (0.999 would keep 37% of the one before)
PRESETS["digits_pd"] = TrainConfig(**{**_FEW, "steps": 5_000}, family="progressive", teacher="digits_edm",
                                   start_steps=32, final_steps=1, ema_decay=0.99)
# Lesson 12's latent consistency model (Luo et al. 2023) of lesson 7's shapes_ldm: its latents and captions, its
# network and weights (`model` is the teacher's), the teacher's Heun step guided at lesson 7's scale w = 3 (folded into
# the student), 18 Karras intervals up to sigma 20 (where lesson 7's sampling starts), float32 as the digits students
PRESETS["shapes_lcm"] = TrainConfig(data="shapes_latents", family="latent_consistency", teacher="shapes_ldm",
                                    guidance=3.0, model={"kind": "text_unet"}, batch_size=64, lr=1e-4, steps=2_000,
                                    amp=False)

# Lesson 15's policies (Diffusion Policy in miniature, Chi et al. 2023): DDPM on the expert's action chunks given the
# position, 100 cosine timesteps as theirs; and the regression baseline: the same network, data, batch and budget.
# 4,000 steps with 256 hidden units: 93% success (DDIM 10 trailing, clip 1); 8,000 with 128: 90%; 8,000 with 256: 95%
# (200 episodes each, one seed; python /tmp sweeps of Trainer(TrainConfig(data="reaching", ...)))
PRESETS["reaching_diffusion"] = TrainConfig(data="reaching", conditional=True, label_dropout=0.0, schedule="cosine",
                                            T=100, model={"kind": "mlp", "hidden": 256, "depth": 3}, batch_size=256,
                                            lr=1e-3, steps=8_000)
PRESETS["reaching_regression"] = TrainConfig(data="reaching", family="regression", batch_size=256, lr=1e-3,
                                             model={"kind": "mlp", "hidden": 256, "depth": 3}, steps=8_000)

# Lesson 15's sound: diffusion on synthetic notes (course_lib.audio) with a 1D UNet, the digits preset's schedule
PRESETS["notes"] = TrainConfig(data="notes", model={"kind": "unet1d", "base": 16, "mults": [1, 2, 4], "kernel": 5},
                               schedule="cosine", batch_size=64, lr=1e-3, steps=4_000)


def preset(name: str, **overrides) -> TrainConfig:
    """A copy of a named preset, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(copy.deepcopy(PRESETS[name]), **overrides)
