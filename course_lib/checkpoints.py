"""Checkpoints: atomic save, validated load, and the small pretrained models shipped in data/."""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch

from . import SHIPPED_MODELS

FORMAT = "course_lib.checkpoint"
VERSION = 1
KINDS = ("train_state", "weights")
SHIPPED = SHIPPED_MODELS


def _write_atomic(write, path: str | Path, replace: bool) -> Path:
    from .outputs import no_space, publish

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path, replace)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = no_space(path, e) if isinstance(e, Exception) else None
        if full is not None:
            raise full from None
        raise
    return path


def save_atomic(obj, path: str | Path, replace: bool = True) -> Path:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file at `path`.
    replace=False refuses to replace a file (FileExistsError), even one that appeared while the command ran."""
    return _write_atomic(lambda f: torch.save(obj, f), path, replace)


def write_bytes_atomic(data: bytes, path: str | Path, replace: bool = True) -> Path:
    """Write bytes through a temporary file in the same folder and a rename: never half a file at `path`."""
    return _write_atomic(lambda f: f.write(data), path, replace)


def write_text_atomic(text: str, path: str | Path, replace: bool = True) -> Path:
    """Write a UTF-8 text file through a temporary file in the same folder and a rename: never half a file at `path`."""
    return write_bytes_atomic(text.encode("utf-8"), path, replace)


def write_json_atomic(data, path: str | Path, replace: bool = True) -> Path:
    """Write a JSON file (indented, sorted keys) through a temporary file and a rename; a benchmark's list of flat
    records is written one record per line, which keeps data/ lean and diffs readable."""
    return write_text_atomic(json_text(data), path, replace)


def json_text(data) -> str:
    """JSON with sorted keys, indented, except a list of flat records (the file itself, or its top-level "records",
    which then comes last): one record per line."""
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return "[\n" + ",\n".join("  " + json.dumps(r, sort_keys=True) for r in data) + "\n]\n"
    records = data.get("records") if isinstance(data, dict) else None
    if not (isinstance(records, list) and records and all(isinstance(r, dict) for r in records)):
        return json.dumps(data, indent=2, sort_keys=True) + "\n"
    rest = json.dumps({k: v for k, v in data.items() if k != "records"}, indent=2, sort_keys=True)
    lines = ",\n".join("    " + json.dumps(r, sort_keys=True) for r in records)
    body = rest[:-1].rstrip() + ("," if len(data) > 1 else "") + f'\n  "records": [\n{lines}\n  ]\n}}'
    return body + "\n"


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load and validate a course_lib checkpoint; a missing, corrupt or foreign file gives a clear ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    _check_integrity(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle of code or objects ...
        detail = _torch_detail(e)
        if isinstance(e, pickle.UnpicklingError) and "global" in detail.lower():  # refused: never unpickled
            raise ValueError(f"{path} holds Python objects besides tensors, which course_lib refuses to unpickle "
                             f"(unpickling can run code): {detail.rstrip('.')}. It is not a course_lib checkpoint; "
                             "never load a file you did not make yourself with weights_only=False.") from None
        raise ValueError(f"{path} is not a readable checkpoint (corrupt or truncated?): "
                         f"{type(e).__name__}: {detail}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a course_lib checkpoint (no format={FORMAT!r} field)")
    if ckpt.get("version") != VERSION or ckpt.get("kind") not in KINDS:
        raise ValueError(f"{path}: unsupported checkpoint version {ckpt.get('version')!r} "
                         f"or kind {ckpt.get('kind')!r}; this course_lib reads version {VERSION}")
    _check_fields(path, ckpt)
    return ckpt


def _torch_detail(error: BaseException) -> str:
    """The line of a torch.load error that says what is wrong, without PyTorch's advice to retry with
    weights_only=False (wrong advice for a file of unknown origin)."""
    advice = ("weights only load failed", "weights_only", "re-running", "documentation", "trusted source")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not any(a in line.lower() for a in advice)]
    return (useful or ["(no detail)"])[0][:200]


def _check_integrity(path: Path) -> None:
    """torch.save writes a zip whose members carry CRC-32 checksums that torch.load does not verify: check them, so
    a flipped bit or a damaged copy is refused instead of loading slightly wrong weights."""
    if not zipfile.is_zipfile(path):
        return  # not torch's zip format: torch.load says what it is
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path} is damaged (truncated or corrupt: {e}); copy or download it again") from None
    if bad is not None:
        raise ValueError(f"{path} is damaged: the bytes of {bad} do not match their stored checksum (a flipped bit "
                         "or a bad copy); copy or download it again, or retrain it")


def _check_fields(path: Path, ckpt: dict) -> None:
    """A crafted or foreign card gets a clear error naming the file, not a KeyError later."""
    needed = {"train_state": ("config", "model_config", "ema"), "weights": ("config", "model_config", "weights")}
    for key in needed[ckpt["kind"]]:
        if key not in ckpt:
            raise ValueError(f"{path} is missing its {key!r} entry: not a complete course_lib checkpoint")
    for key in ("config", "model_config"):
        if not isinstance(ckpt[key], dict):
            raise ValueError(f"{path}: its {key!r} entry must be a dict, got {type(ckpt[key]).__name__}")
    weights = ckpt["weights"] if ckpt["kind"] == "weights" else ckpt["ema"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{path}: its weights must be a dict of tensors")
    if not isinstance(ckpt.get("card", {}), dict):
        raise ValueError(f"{path}: its card must be a dict, got {type(ckpt['card']).__name__}")


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
    _load_into(model, _weights(ckpt, which), path)
    return model


def _load_into(model: torch.nn.Module, weights: dict, path) -> None:
    """Load weights into the model the checkpoint's config describes; weights of other shapes or names name the file."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"{path}: its weights do not fit the model its config describes ({detail})") from None


def _weights(ckpt: dict, which: str) -> dict:
    """The state dict to load: an exported file's weights, or a training state's 'ema' or 'model'."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    return ckpt["weights"] if ckpt["kind"] == "weights" else ckpt[which]


def shipped_dir() -> Path:
    """The folder holding the shipped checkpoints: $COURSE_CHECKPOINTS, the repo's data/, or the Colab clone's."""
    chosen = os.environ.get("COURSE_CHECKPOINTS")
    if chosen and not (Path(chosen) / "ring8.pt").is_file():
        raise FileNotFoundError(f"COURSE_CHECKPOINTS is set to {chosen}, which holds no shipped checkpoints "
                                "(ring8.pt): point it at the course's data/ folder, or unset it")
    candidates = [chosen, Path(__file__).resolve().parents[1] / "data",
                  "/content/diffusion-course/data", Path.cwd() / "data", Path.cwd().parent / "data"]
    for c in candidates:
        if c and (Path(c) / "ring8.pt").is_file():
            return Path(c)
    raise FileNotFoundError("cannot find the shipped checkpoints (data/ring8.pt): run from the course repository, "
                            "or set COURSE_CHECKPOINTS to the folder that holds them")


def read_json(path: str | Path):
    """A JSON file's content; a malformed or missing one is a ValueError / FileNotFoundError that names the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); if it is a file the course ships, restore it with "
                         f"`git checkout -- {path.name}` in its folder") from None


def shipped_json(name: str):
    """A benchmark record or model card shipped in data/ (e.g. "bench_guidance.json"), read with a clear error."""
    return read_json(shipped_dir() / name)


class Pretrained(NamedTuple):
    model: torch.nn.Module
    schedule: object
    config: dict
    card: dict


def load_pretrained(name_or_path: str | Path, device=None, which: str = "ema") -> Pretrained:
    """A diffusion, flow, EDM or few-step model ready to sample (eval mode), its noise schedule (None for all but
    diffusion's), its training config and its card."""
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
    family = config.get("family", "diffusion")
    # a flow-matching model (lesson 9), a preconditioned denoiser (lesson 11's edm family) and lesson 12's few-step
    # students (consistency models, progressive distillation) have no discrete schedule
    scheduleless = family in ("flow", "edm", "consistency", "progressive", "adversarial")
    if not scheduleless and ("schedule" not in config or family != "diffusion"):
        raise ValueError(f"{path} holds no diffusion model, nor a flow or EDM model (family {family!r}); load it "
                         "with load_model")
    model = build_model(ckpt["model_config"])
    _load_into(model, _weights(ckpt, which), path)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    card = ckpt.get("card", {})
    model.sampling = card.get("sampling")  # tuned noise levels: samplers.sample uses them by default
    model.recommended_sampler = card.get("recommended_sampler")  # and this sampler, when none is named
    return Pretrained(model, None if scheduleless else NoiseSchedule.named(config["schedule"], config["T"]), config,
                      card)


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
    _load_into(model, _weights(ckpt, which), path)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return Loaded(model, ckpt["config"], ckpt.get("card", {}))
