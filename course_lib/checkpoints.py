"""Checkpoints: atomic save, validated load, and the small pretrained models shipped in data/."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from . import SHIPPED_MODELS

FORMAT = "course_lib.checkpoint"
VERSION = 1
KINDS = ("train_state", "weights")
SHIPPED = SHIPPED_MODELS


def _default_mode() -> int:
    """The permissions a new file would get (mkstemp's files are private, 0600, otherwise)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_atomic(obj, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_bytes_atomic(data: bytes, path: str | Path) -> Path:
    """Write bytes through a temporary file in the same folder and a rename: never half a file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a UTF-8 text file through a temporary file in the same folder and a rename: never half a file at `path`."""
    return write_bytes_atomic(text.encode("utf-8"), path)


def write_json_atomic(data, path: str | Path) -> Path:
    """Write a JSON file (indented, sorted keys) through a temporary file and a rename."""
    return write_text_atomic(json.dumps(data, indent=2, sort_keys=True) + "\n", path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load and validate a course_lib checkpoint; a missing, corrupt or foreign file gives a clear ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle of something else ...
        msg = str(e)  # PyTorch's own text suggests weights_only=False: wrong advice for a file of unknown origin
        detail = (msg.split("WeightsUnpickler error:", 1)[1].strip() if "WeightsUnpickler error:" in msg else msg)
        detail = (detail.splitlines() or [""])[0][:200]
        if "Unsupported global" in detail:  # a pickle of code or objects: never unpickle it
            raise ValueError(f"{path} holds Python objects besides tensors, which course_lib refuses to unpickle "
                             f"(unpickling can run code): {detail.split(' was not')[0]}. It is not a course_lib "
                             "checkpoint; never load a file you did not make yourself with weights_only=False.") from None
        raise ValueError(f"{path} is not a readable checkpoint (corrupt or truncated?): "
                         f"{type(e).__name__}: {detail}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a course_lib checkpoint (no format={FORMAT!r} field)")
    if ckpt.get("version") != VERSION or ckpt.get("kind") not in KINDS:
        raise ValueError(f"{path}: unsupported checkpoint version {ckpt.get('version')!r} "
                         f"or kind {ckpt.get('kind')!r}; this course_lib reads version {VERSION}")
    return ckpt


def check_same_model(model_config: dict, expected: dict, where: str = "checkpoint") -> None:
    """Refuse weights saved from a different architecture, naming what differs."""
    if model_config != expected:
        diff = sorted(k for k in set(model_config) | set(expected) if model_config.get(k) != expected.get(k))
        detail = ", ".join(f"{k}: {model_config.get(k)!r} in the {where}, {expected.get(k)!r} here" for k in diff)
        raise ValueError(f"the {where} holds a different model ({detail})")


def load_weights(model: torch.nn.Module, path: str | Path, which: str = "ema") -> torch.nn.Module:
    """Load the weights of a checkpoint into `model` (which must have the same .config); returns the model."""
    ckpt = load_checkpoint(path)
    check_same_model(ckpt["model_config"], getattr(model, "config", {}), where=f"checkpoint {Path(path).name}")
    model.load_state_dict(_weights(ckpt, which))
    return model


def _weights(ckpt: dict, which: str) -> dict:
    """The state dict to load: an exported file's weights, or a training state's 'ema' or 'model'."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    return ckpt["weights"] if ckpt["kind"] == "weights" else ckpt[which]


def shipped_dir() -> Path:
    """The folder holding the shipped checkpoints: $COURSE_CHECKPOINTS, the repo's data/, or the Colab clone's."""
    candidates = [os.environ.get("COURSE_CHECKPOINTS"), Path(__file__).resolve().parents[1] / "data",
                  "/content/diffusion-course/data", Path.cwd() / "data", Path.cwd().parent / "data"]
    for c in candidates:
        if c and (Path(c) / "ring8.pt").is_file():
            return Path(c)
    raise FileNotFoundError("cannot find the shipped checkpoints (data/ring8.pt): run from the course repository, "
                            "or set COURSE_CHECKPOINTS to the folder that holds them")


class Pretrained(NamedTuple):
    model: torch.nn.Module
    schedule: object
    config: dict
    card: dict


def load_pretrained(name_or_path: str | Path, device=None, which: str = "ema") -> Pretrained:
    """A diffusion or flow model ready to sample (eval mode), its noise schedule (None for flow matching), its training
    config and its card."""
    from .nets import build_model
    from .schedules import NoiseSchedule

    path = Path(name_or_path)
    if str(name_or_path) in SHIPPED:
        path = shipped_dir() / f"{name_or_path}.pt"
    elif not path.exists() and path.suffix == "" and len(path.parts) == 1:  # a mistyped shipped name
        raise ValueError(f"no shipped model called {str(name_or_path)!r}; the shipped ones are {list(SHIPPED)} "
                         "(or give the path of a checkpoint file)")
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    if ckpt["model_config"].get("kind") == "text_unet":
        raise ValueError(f"{path} holds a text-to-image model: load it with "
                         "course_lib.text2image.load_text_to_image")
    flow = config.get("family") == "flow"  # a flow-matching model (lesson 9): samples like one, has no schedule
    if not flow and ("schedule" not in config or config.get("family", "diffusion") != "diffusion"):
        raise ValueError(f"{path} holds no diffusion model, nor a flow model (family {config.get('family')!r}); "
                         f"load it with load_model")
    model = build_model(ckpt["model_config"])
    model.load_state_dict(_weights(ckpt, which))
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    card = ckpt.get("card", {})
    model.sampling = card.get("sampling")  # tuned noise levels: samplers.sample uses them by default
    model.recommended_sampler = card.get("recommended_sampler")  # and this sampler, when none is named
    return Pretrained(model, None if flow else NoiseSchedule.named(config["schedule"], config["T"]), config, card)


def update_card(path: str | Path, **fields) -> dict:
    """Add or replace fields of a checkpoint's card, in the file and in its JSON sidecar; the weights are unchanged."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    card = {**ckpt.get("card", {}), **fields}
    ckpt["card"] = card
    save_atomic(ckpt, path)
    if path.with_suffix(".json").exists():
        write_json_atomic(card, path.with_suffix(".json"))
    return card


class Loaded(NamedTuple):
    model: torch.nn.Module
    config: dict
    card: dict


def load_model(path: str | Path, device=None, which: str = "ema") -> Loaded:
    """Any exported model (diffusion network, GAN generator, VAE) in eval mode, with its training config and card."""
    from .nets import build_model

    ckpt = load_checkpoint(path)
    model = build_model(ckpt["model_config"])
    model.load_state_dict(_weights(ckpt, which))
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return Loaded(model, ckpt["config"], ckpt.get("card", {}))
