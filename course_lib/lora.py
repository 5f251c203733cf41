"""LoRA (Hu et al. 2022, eq. 3: h = W x + (alpha / r) B A x, B zero at the start) on the course's networks through the
`peft` library, saved in peft's own format (adapter_config.json + adapter_model.safetensors) so that peft, and
diffusers for a Stable Diffusion UNet, load it back; and the same on a diffusers UNet2DConditionModel.

peft rather than hand-written adapters: it is what diffusers' training scripts and the Hub's LoRA files use, it
handles Linear and 1x1-conv layers, merging and several adapters, and its files are the ones learners will meet.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

ATTENTION = r".*\.(q|k|v|qkv|proj)"  # every attention projection of a TextUNet (cross: q k v proj; self: qkv proj)
ATTENTION_AND_CONV = r".*\.(q|k|v|qkv|proj|conv1|conv2)"  # ... and both 3x3 convs of every residual block (LoCon)
SD_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # the same for diffusers' UNet2DConditionModel (attn1 and attn2)
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"  # peft's file names
CARD_NAME = "course_card.json"  # what the course measured about the adapter, beside peft's files
PREFIX = "base_model.model."  # a PeftModel's key prefix in peft's files


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, alpha: float) -> torch.Tensor:
    """A LoRA linear layer's output (Hu et al. 2022, eq. 3): x W^T + b + (alpha / r) (x A^T) B^T, r = A's rows."""
    out = x @ weight.T + (bias if bias is not None else 0)
    return out + (alpha / lora_A.shape[0]) * (x @ lora_A.T) @ lora_B.T


def _config(rank: int, alpha: float | None, targets, dropout: float = 0.0):
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    targets = targets if isinstance(targets, str) else list(targets)
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias="none",
                      init_lora_weights=True)  # A Kaiming-uniform, B zero: the adapted model starts as the model


def add_lora(model: nn.Module, rank: int = 4, alpha: float | None = None, targets=ATTENTION, seed: int = 0) -> nn.Module:
    """Freeze `model` and put LoRA adapters of `rank` on the layers `targets` names (peft's target_modules: a regex
    or a list of name suffixes), in place; alpha defaults to the rank (scale 1). Returns the model: only the LoRA
    matrices require grad, and at first it computes what it computed before (B = 0)."""
    from peft import inject_adapter_in_model

    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("this model already has LoRA adapters (merge_lora or a fresh copy first)")
    model.requires_grad_(False)
    config = _config(rank, alpha, targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, model)
        except ValueError as e:  # peft's 'Target modules ... not found'
            raise ValueError(f"no layer of this {type(model).__name__} matches targets {targets!r} ({e})") from None
    if not lora_parameters(model):
        raise ValueError(f"no layer of this {type(model).__name__} matches targets {targets!r}")
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA matrices (A and B of every adapted layer)."""
    return [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]


def parameter_counts(model: nn.Module) -> dict:
    """{'lora': LoRA parameters, 'base': the model's own, 'share': lora / base}."""
    lora = sum(p.numel() for p in lora_parameters(model))
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return {"lora": lora, "base": base, "share": lora / base}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's key names ('...q.lora_A.weight', no adapter name)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_lora(model: nn.Module, folder, card: dict | None = None, force: bool = False) -> Path:
    """Write the adapter as peft's PeftModel.save_pretrained does (adapter_config.json, adapter_model.safetensors with
    its key names), so `PeftModel.from_pretrained(model, folder)` loads it too; an existing adapter there is only
    replaced with force=True. `card` (what was measured) goes to course_card.json beside them."""
    from safetensors.torch import save_file

    from .checkpoints import write_text_atomic

    folder = Path(folder)
    if (folder / WEIGHTS_NAME).exists() and not force:
        raise FileExistsError(f"{folder / WEIGHTS_NAME} exists; pass force=True to replace it")
    config = _peft_config(model)
    if config is None:
        raise ValueError("this model has no LoRA adapter to save (add_lora first)")
    folder.mkdir(parents=True, exist_ok=True)
    weights = {PREFIX + k: v for k, v in lora_state_dict(model).items()}
    save_file(weights, str(folder / (WEIGHTS_NAME + ".tmp")), metadata={"format": "pt"})
    (folder / (WEIGHTS_NAME + ".tmp")).replace(folder / WEIGHTS_NAME)
    cfg = config.to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    write_text_atomic(json.dumps(cfg, indent=1, default=str) + "\n", folder / CONFIG_NAME)
    if card is not None:
        write_text_atomic(json.dumps(card, indent=1) + "\n", folder / CARD_NAME)
    return folder


def _peft_config(model: nn.Module):
    return getattr(model, "peft_config", {}).get("default")


def load_lora(model: nn.Module, folder) -> nn.Module:
    """Put the adapter saved in `folder` (save_lora's, or any peft LoRA for this architecture) on `model`, in place,
    frozen. Mismatched keys are an error, not a silent partial load."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: a LoRA folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    known = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in cfg.items() if k in known and k not in ("peft_type", "task_type")})
    model.requires_grad_(False)
    inject_adapter_in_model(config, model)
    weights = {k.removeprefix(PREFIX): v for k, v in load_file(str(folder / WEIGHTS_NAME)).items()}
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as e:  # torch's size mismatch: an adapter of another architecture
        raise ValueError(f"the adapter in {folder} does not fit this model: {str(e).splitlines()[1].strip()}") from None
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing or getattr(result, "unexpected_keys", []):
        raise ValueError(f"the adapter in {folder} does not fit this model: missing {missing[:4]}, unexpected "
                         f"{list(getattr(result, 'unexpected_keys', []))[:4]}")
    return model.requires_grad_(False)


def read_card(folder) -> dict:
    """The course card save_lora wrote beside the adapter ({} if none)."""
    path = Path(folder) / CARD_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer (W + (alpha / r) B A) and remove the adapters, in place: the result is
    the plain architecture again, as fast as the base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


# ---- Stable Diffusion (diffusers): the same adapters, saved as diffusers' pipelines load them ------------------------


def add_sd_lora(unet, rank: int = 4, alpha: float | None = None, targets=SD_ATTENTION):
    """LoRA on a diffusers UNet2DConditionModel's attention projections, as diffusers' train_text_to_image_lora.py
    adds it (unet.add_adapter with a peft LoraConfig); the UNet is frozen, the adapters train."""
    unet.requires_grad_(False)
    unet.add_adapter(_config(rank, alpha, targets))
    return unet


def save_sd_lora(unet, folder, force: bool = False) -> Path:
    """The UNet's adapter as pytorch_lora_weights.safetensors in diffusers' key format, written by the pipeline's
    own save_lora_weights, so `pipe.load_lora_weights(folder)` loads it (on SD 1.5 as on the tiny pipeline)."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    if (folder / "pytorch_lora_weights.safetensors").exists() and not force:
        raise FileExistsError(f"{folder} already holds LoRA weights; pass force=True to replace them")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    diffusers.StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder


def train_sd_lora(pipe, images: torch.Tensor, prompts, rank: int = 4, steps: int = 400, lr: float = 1e-4,
                  batch_size: int = 1, seed: int = 0, progress: bool = True) -> dict:
    """LoRA fine-tuning of a Stable Diffusion pipeline's UNet on a few captioned images, as diffusers'
    train_dreambooth_lora.py does it (without its prior images): the VAE's latents times its scaling factor, noise at
    a uniform timestep of the pipeline's DDPM schedule, the eps (or v) loss; VAE and text encoder frozen. Adds the
    adapters (add_sd_lora) and trains them in place; returns {'losses', 'seconds', 'trainable'}. On SD 1.5 on a GPU:
    5 images of 512x512, 400 steps, a few minutes; on the tiny pipeline the same code runs on a CPU in seconds."""
    import time

    import diffusers
    import torch.nn.functional as F

    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if images.ndim != 4 or len(prompts) != len(images):
        raise ValueError(f"expected images (n, 3, H, W) in [-1, 1] and n prompts, got {tuple(images.shape)} and "
                         f"{len(prompts)} prompts")
    device, dtype = pipe.unet.device, pipe.unet.dtype
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dist = pipe.vae.encode(images.to(device, pipe.vae.dtype)).latent_dist
        latents = (dist.mean * pipe.vae.config.scaling_factor).float()
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        states = pipe.text_encoder(ids)[0].float()
    schedule = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    add_sd_lora(pipe.unet, rank)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    for p in params:  # adapters train in float32 even when the UNet is fp16 (diffusers' scripts cast them too)
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, start = [], time.perf_counter()
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="SD LoRA", leave=False)
    pipe.unet.train()
    for _ in it:
        idx = torch.randint(len(latents), (batch_size,), generator=g)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(schedule.config.num_train_timesteps, (batch_size,), generator=g).to(device)
        noisy = schedule.add_noise(x0, noise, t)
        target = noise if schedule.config.prediction_type == "epsilon" else schedule.get_velocity(x0, noise, t)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = pipe.unet(noisy.to(dtype), t, encoder_hidden_states=states[idx].to(dtype)).sample
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    pipe.unet.eval().requires_grad_(False)
    return {"losses": losses, "seconds": time.perf_counter() - start, "trainable": sum(p.numel() for p in params)}
