"""A small digits classifier, trained once and shipped: it judges generated digits (confidence, class histogram)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints as ckpt_io
from .data import digits_split


class DigitsClassifier(nn.Module):
    """Two 3x3 conv layers, a pooling step and a linear head for 8x8 digits in [-1, 1]."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.config = dict(kind="digits_classifier", width=width)
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.SiLU())
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-d penultimate features (for Frechet distances)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"expected digits of shape (B, 1, 8, 8), got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def accuracy(clf: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images classified as their label."""
    return (clf(images).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def judge(clf: nn.Module, images: torch.Tensor, batch: int = 1000) -> dict:
    """Mean confidence (max softmax probability), the predicted-class histogram, and its largest gap to uniform."""
    probs = torch.cat([F.softmax(clf(images[i:i + batch].float().cpu()), 1) for i in range(0, len(images), batch)])
    hist = torch.bincount(probs.argmax(1), minlength=10).double() / len(images)
    return {"confidence": probs.max(1).values.mean().item(), "histogram": hist.tolist(),
            "max_class_gap": (hist - 0.1).abs().max().item()}


def train_classifier(steps: int = 2_000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     progress: bool = True) -> tuple[DigitsClassifier, dict]:
    """Train on the digits train split with small random shifts; returns the model (eval mode) and a card."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = DigitsClassifier()
    x_train, y_train = digits_split("train")
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    steps_iter = range(steps)
    if progress:
        from tqdm.auto import tqdm
        steps_iter = tqdm(steps_iter, desc="train classifier", unit="step")
    start = time.perf_counter()
    for step in steps_iter:
        idx = torch.randint(len(x_train), (batch_size,), generator=g)
        x = x_train[idx]
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # +-1 pixel: generated digits are not centred exactly
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi))).item()
        loss = F.cross_entropy(clf(x), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval()
    x_test, y_test = digits_split("test")
    card = {"train_seconds": round(time.perf_counter() - start, 1), "steps": steps, "seed": seed,
            "train_accuracy": accuracy(clf, x_train, y_train), "test_accuracy": accuracy(clf, x_test, y_test),
            "test_confidence": judge(clf, x_test)["confidence"], "test_images": len(x_test)}
    return clf, card


def export_classifier(clf: DigitsClassifier, path, card: dict):
    """Write the classifier's weights and card in the course checkpoint format (atomically)."""
    state = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": "weights", "config": {"preset": "digits_classifier"},
             "model_config": clf.config, "weights": clf.state_dict(), "card": card}
    return ckpt_io.save_atomic(state, path)


def load_classifier(path=None) -> DigitsClassifier:
    """The shipped digits classifier (data/digits_classifier.pt), in eval mode."""
    path = path or ckpt_io.shipped_dir() / "digits_classifier.pt"
    clf = DigitsClassifier()
    return ckpt_io.load_weights(clf, path).eval().requires_grad_(False)
