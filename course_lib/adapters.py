"""Lesson 13's shipped adapters of lesson 7's text-to-shapes model: how each is trained (`python -m course_lib train
--preset NAME --out data/NAME`), and each saved as a folder in its ecosystem's format with the course's card beside:

- shapes_star_lora: LoRA (course_lib.adapt's recommended run) in peft's files (adapter_config.json +
  adapter_model.safetensors), which peft's `PeftModel.from_pretrained` and `set_peft_model_state_dict` read;
- shapes_star_ti: textual inversion's one learned embedding as `learned_embeds.safetensors` ({"star": vector}), the
  file diffusers' `load_textual_inversion` reads;
- shapes_layout_controlnet: a ControlNet (Zhang et al. 2023) as `controlnet.safetensors` (fp16 state dict).
Each folder holds `course_card.json`: the preset, steps, seconds, machine and the exact command that made it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import SHIPPED_ADAPTERS
from .lora import CARD_NAME

# the recommended LoRA run (course_lib.adapt.AdaptConfig's defaults: adapters on the attention projections and the
# residual blocks' convs, DreamBooth's prior on, 200 images, 800 steps at lr 3e-3; lesson 13 and `bench adapt` measure
# why); textual inversion on the same images and steps at its own rate (no prior: old prompts never hold its word);
# the ControlNet at the benchmark's budget
ADAPTER_PRESETS = {
    "shapes_star_lora": dict(kind="lora"),  # AdaptConfig's defaults: the recommended run
    "shapes_star_ti": dict(kind="textual_inversion", method="textual_inversion", lr=5e-3, prior_weight=0.0),
    "shapes_layout_controlnet": dict(kind="controlnet", steps=2000),
}
EMBEDS_NAME, CONTROLNET_NAME = "learned_embeds.safetensors", "controlnet.safetensors"
assert set(ADAPTER_PRESETS) == set(SHIPPED_ADAPTERS)


def train_adapter(name: str, steps: int | None = None, progress: bool = True, measure: int = 200):
    """Train the adapter preset `name` on the shipped shapes_ldm and measure it on `measure` test prompts per question
    (0: not at all); returns (card, write(folder, card))."""
    from .text2image import load_text_to_image

    if name not in ADAPTER_PRESETS:
        raise ValueError(f"unknown adapter preset {name!r}; choose one of {list(ADAPTER_PRESETS)}")
    spec = {k: v for k, v in ADAPTER_PRESETS[name].items() if k != "kind"}
    spec.update({"steps": steps} if steps else {})
    kind, base = ADAPTER_PRESETS[name]["kind"], load_text_to_image("shapes_ldm")
    if kind == "controlnet":
        from .controlnet import train_controlnet

        model, card = train_controlnet(base, spec["steps"], progress=progress)
        if measure:
            from .controlnet import placement

            card["quality"] = {"iou": placement(base, model, measure)["iou"],
                               "plain_iou": placement(base, None, measure)["iou"], "prompts": measure}
        return card, lambda folder, c: _write(folder, c, {CONTROLNET_NAME: {
            k: v.half() for k, v in model.controlnet.state_dict().items()}})
    from .adapt import AdaptConfig, adapt, concept_model

    model, card = adapt(base, AdaptConfig(**spec), progress=progress)
    if measure:
        from .adapt import evaluate
        from .attributes import load_attribute_classifier
        from .concepts import load_concept_judge

        card["quality"] = evaluate(model, load_concept_judge(), load_attribute_classifier(), measure, measure)
        card["quality_before"] = evaluate(concept_model(base), load_concept_judge(), load_attribute_classifier(),
                                          measure, measure)
    if kind == "lora":
        from .lora import save_lora

        def write(folder, c):
            save_lora(model.unet, folder, card=c)
        return card, write
    from .concepts import WORD, WORD_INDEX

    row = model.text_encoder.tokens.weight[WORD_INDEX].detach().clone()
    return card, lambda folder, c: _write(folder, c, {EMBEDS_NAME: {WORD: row}})


def _write(folder, card: dict, files: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for filename, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / filename))
    (folder / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


def publish_folder(write, folder, replace: bool) -> Path:
    """write(tmp) into a fresh folder beside `folder`, then put it in place: an existing folder is replaced only with
    replace (--force), and only once the new one is complete, so a failed run never leaves half an adapter."""
    folder = Path(folder)
    if folder.exists() and not replace:
        raise FileExistsError(f"{folder} exists: pass --force to replace it, or --out another folder")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; an adapter is a folder: --out a folder name")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)  # mkdtemp makes it private; an adapter folder reads like any other
        for f in tmp.iterdir():
            f.chmod(0o666 & ~mask)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def adapter_folder(name_or_folder) -> Path:
    """A shipped adapter's folder (data/NAME) by its name, or any folder that holds one."""
    from .checkpoints import shipped_dir

    folder = shipped_dir() / str(name_or_folder) if str(name_or_folder) in SHIPPED_ADAPTERS else Path(name_or_folder)
    if not (folder / CARD_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no adapter (no {CARD_NAME}); shipped adapters: {list(SHIPPED_ADAPTERS)}"
                                " (each made by `python -m course_lib train --preset NAME --out data/NAME`)")
    return folder


def adapter_card(name_or_folder) -> dict:
    return json.loads((adapter_folder(name_or_folder) / CARD_NAME).read_text())


def load_adapted(name_or_folder, base=None):
    """Lesson 7's model (`base`, default the shipped shapes_ldm) with the adapter applied: a TextToImage that reads the
    new word (LoRA, textual inversion) or a ControlNet-steered one (set its layout maps with
    `model.unet.set_hint(maps)`). Its card is the base's with the adapter's under 'adapter'."""
    from .adapt import concept_model
    from .text2image import TextToImage, load_text_to_image

    folder = adapter_folder(name_or_folder)
    card = adapter_card(folder)
    base = base if base is not None else load_text_to_image("shapes_ldm")
    if (folder / CONTROLNET_NAME).is_file():
        import copy

        from safetensors.torch import load_file

        from .controlnet import Controlled, ControlNet

        unet = copy.deepcopy(base.unet).eval().requires_grad_(False)
        net = ControlNet(unet, latent_size=base.shape[-1])
        net.load_state_dict({k: v.float() for k, v in load_file(str(folder / CONTROLNET_NAME)).items()})
        model = TextToImage(Controlled(unet, net.eval().requires_grad_(False)), base.schedule, base.text_encoder,
                            base.autoencoder, base.scale_factor, dict(base.card))
    elif (folder / EMBEDS_NAME).is_file():
        from safetensors.torch import load_file

        from .concepts import WORD, WORD_INDEX

        model = concept_model(base)
        with torch.no_grad():
            model.text_encoder.tokens.weight[WORD_INDEX] = load_file(str(folder / EMBEDS_NAME))[WORD]
    else:
        from .lora import load_lora

        model = concept_model(base)
        model.unet = load_lora(model.unet, folder).eval()
    model.card = {**model.card, "adapter": card}
    return model


def main_train(args, train_command) -> int:
    """`python -m course_lib train --preset NAME` for an adapter: a folder, written whole before it replaces one
    (--force); `train_command(args, out)` spells the command for the card."""
    import json
    import platform

    from .runtime import device_info

    for flag in ("state", "half"):
        if getattr(args, flag, None):
            raise ValueError(f"--{flag.replace('_', '-')} is not used by adapter presets ({args.preset} trains in one go)")
    if args.eval_samples is not None and not 1 <= args.eval_samples <= 10_000:
        raise ValueError(f"--eval-samples must be between 1 and 10,000, got {args.eval_samples}")
    if args.steps is not None and not 1 <= args.steps <= 10**6:
        raise ValueError(f"--steps must be between 1 and 1,000,000, got {args.steps}")
    out = Path(args.out or args.preset)
    if out.suffix:
        raise ValueError(f"--out names a folder for an adapter (e.g. data/{args.preset}), got {out}")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists: pass --force to replace it, or --out another folder")
    info = device_info(args.device)
    machine = f"{info.name}; {platform.machine()}; torch {__import__('torch').__version__}"
    card, write = train_adapter(args.preset, args.steps, measure=0 if args.no_eval else args.eval_samples or 200)
    card.update(preset=args.preset, machine=machine, command=train_command(args, out))
    publish_folder(lambda tmp: write(tmp, card), out, replace=args.force)
    print(json.dumps(card, indent=2, sort_keys=True))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"Wrote {out}/ ({size / 1e6:.2f} MB: {', '.join(sorted(f.name for f in out.iterdir()))})")
    return 0
