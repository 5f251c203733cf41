"""Datasets, offline first: 2D distributions with known modes, scikit-learn's 8x8 digits, and MNIST / Fashion-MNIST."""
from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import struct
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# ---- 2D distributions ------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianMixture2D:
    """An equal-weight mixture of isotropic 2D Gaussians with known modes (the mode-coverage benchmark)."""

    name: str
    modes: torch.Tensor  # (K, 2)
    std: float

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """n points (n, 2) float32, and the index of the mode each came from if return_labels."""
        n = _check_n(n)
        labels = torch.randint(len(self.modes), (n,), generator=generator)
        x = self.modes[labels] + self.std * torch.randn(n, 2, generator=generator)
        return (x, labels) if return_labels else x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of each point (n, 2) under the mixture, in nats."""
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"points must have shape (n, 2), got {tuple(x.shape)}")
        d2 = ((x[:, None, :] - self.modes.double()[None]) ** 2).sum(-1)
        log_comp = -d2 / (2 * self.std**2) - math.log(2 * math.pi * self.std**2)
        return torch.logsumexp(log_comp, dim=1) - math.log(len(self.modes))


def ring_of_gaussians(k: int = 8, radius: float = 1.0, std: float = 0.05) -> GaussianMixture2D:
    """k Gaussians evenly spaced on a circle (the '8 Gaussians' of Metz et al. 2017, unrolled GANs)."""
    angles = torch.arange(k, dtype=torch.float32) * 2 * math.pi / k
    modes = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return GaussianMixture2D(f"ring{k}", modes, std)


def grid_of_gaussians(side: int = 5, spacing: float = 0.5, std: float = 0.05) -> GaussianMixture2D:
    """side x side Gaussians on a square grid centred at 0 (the 25-Gaussian test of Srivastava et al. 2017, VEEGAN)."""
    ticks = (torch.arange(side, dtype=torch.float32) - (side - 1) / 2) * spacing
    gx, gy = torch.meshgrid(ticks, ticks, indexing="xy")
    return GaussianMixture2D(f"grid{side * side}", torch.stack([gx.flatten(), gy.flatten()], 1), std)


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"number of samples must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    return n


def _seed_from(generator: torch.Generator | None) -> int:
    return int(torch.randint(2**31 - 1, (1,), generator=generator))


def two_moons(n: int, noise: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
    """scikit-learn's two interleaving half circles, centred and scaled to about [-1, 1]."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(_check_n(n), noise=noise, random_state=_seed_from(generator))
    return torch.from_numpy((x - [0.5, 0.25]) / 1.5).float()


def swiss_roll(n: int, noise: float = 0.3, generator: torch.Generator | None = None) -> torch.Tensor:
    """scikit-learn's swiss roll projected to its (x, z) plane, scaled to about [-1, 1]."""
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(_check_n(n), noise=noise, random_state=_seed_from(generator))
    return torch.from_numpy(x[:, [0, 2]] / 12.0).float()


def checkerboard(n: int, squares: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform points on the dark squares of a squares x squares board covering [-1, 1]^2."""
    n = _check_n(n)
    cells = torch.tensor([(i, j) for i in range(squares) for j in range(squares) if (i + j) % 2 == 0],
                         dtype=torch.float32)
    pick = cells[torch.randint(len(cells), (n,), generator=generator)]
    u = torch.rand(n, 2, generator=generator)
    return (pick + u) * (2 / squares) - 1


TOY_2D = {
    "ring8": lambda n, generator=None: ring_of_gaussians().sample(n, generator),
    "grid25": lambda n, generator=None: grid_of_gaussians().sample(n, generator),
    "two_moons": two_moons,
    "swiss_roll": swiss_roll,
    "checkerboard": checkerboard,
}


def sample_2d(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points (n, 2) from the 2D distribution called `name` (one of TOY_2D)."""
    if name not in TOY_2D:
        raise ValueError(f"unknown 2D dataset {name!r}; choose one of {sorted(TOY_2D)}")
    return TOY_2D[name](n, generator=generator)


# ---- images ------------------------------------------------------------------------------------


def load_digits(with_labels: bool = True):
    """scikit-learn's 1,797 handwritten digits as (N, 1, 8, 8) float32 in [-1, 1], and int64 labels."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    images = torch.from_numpy(d.images).float().unsqueeze(1) / 8.0 - 1.0  # pixel values are 0..16
    labels = torch.from_numpy(d.target).long()
    return (images, labels) if with_labels else images


DIGITS_LEVELS = 17  # sklearn's digits take the values 0..16


def digits_split(split: str = "train", test_size: int = 297):
    """A fixed train/test split of the digits (seeded permutation; 1,500 / 297 by default): images, labels."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = load_digits()
    if not 0 < test_size < len(images):
        raise ValueError(f"test_size must be in (0, {len(images)}), got {test_size}")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    idx = perm[:test_size] if split == "test" else perm[test_size:]
    return images[idx], labels[idx]


MNIST_SOURCES = {
    # torchvision's mirrors and MD5 checksums of the official files.
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }),
    "fashion": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }),
}


def data_home() -> Path:
    """Where downloads are cached: $COURSE_DATA_DIR, else ~/.cache/course_lib."""
    return Path(os.environ.get("COURSE_DATA_DIR", Path.home() / ".cache" / "course_lib"))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format, optionally gzipped) into a numpy array (LeCun et al. 1998)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {body.size} values (truncated?)")
    return body.reshape(shape)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _download(url: str, dest: Path, md5: str | None, timeout: float) -> None:
    """Download url to dest via a temporary file, check its MD5, then rename (never a half-written file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        if md5 is not None and _md5(Path(tmp)) != md5:
            raise RuntimeError(f"checksum mismatch for {url}: the download is corrupt; run again")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_mnist(kind: str = "mnist", split: str = "train", root: str | Path | None = None,
               download: bool = True, base_url: str | None = None, timeout: float = 30.0):
    """MNIST or Fashion-MNIST as (N, 1, 28, 28) float32 in [-1, 1] and int64 labels, downloaded once and cached."""
    if kind not in MNIST_SOURCES:
        raise ValueError(f"kind must be one of {sorted(MNIST_SOURCES)}, got {kind!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    default_url, checksums = MNIST_SOURCES[kind]
    if base_url is not None:
        checksums = dict.fromkeys(checksums)  # a mirror of your own: its files are not the official bytes
    folder = Path(root) if root is not None else data_home() / kind
    prefix = "train" if split == "train" else "t10k"
    names = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
    for name in names:
        path = folder / name
        if path.exists():
            continue
        if not download:
            raise FileNotFoundError(f"{path} is missing and download=False. Put the official file there, "
                                    f"or call load_mnist(..., download=True).")
        url = (base_url or default_url) + name
        try:
            _download(url, path, checksums[name], timeout)
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(
                f"Could not download {url} ({e}). You seem to be offline. Either connect and run again, "
                f"copy the four {kind} .gz files into {folder}, or use load_digits(), which ships with "
                f"scikit-learn and needs no download.") from None
    images, labels = (read_idx(folder / n) for n in names)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 127.5 - 1.0
    return x, torch.from_numpy(labels.astype(np.int64))


# ---- training batches (course_lib.train) ------------------------------------------------------------------------

DUPLICATION = {1: 1000, 10: 20, 100: 5}  # lesson 14: duplication factor -> how many distinct train digits get it


def duplicated_digits(seed: int = 0) -> dict:
    """Lesson 14's memorisation set (Carlini et al. 2023 extracted mostly images the training set held many times):
    distinct digits of the train split (a fixed draw), DUPLICATION[f] of them repeated f times. Returns the rows
    (`images`, `labels`), each row's `factor` and `source` (its index among the distinct images), the `distinct`
    images and each distinct image's `distinct_factor`."""
    train, labels = digits_split("train")
    need = sum(DUPLICATION.values())
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:need]
    factor = torch.cat([torch.full((k,), f) for f, k in DUPLICATION.items()])
    source = torch.arange(need).repeat_interleave(factor)
    return {"images": train[pick][source], "labels": labels[pick][source], "factor": factor[source], "source": source,
            "distinct": train[pick], "distinct_factor": factor, "distinct_index": pick}


MIXTURES = {"ring8": ring_of_gaussians, "grid25": grid_of_gaussians}
SHAPES_IMAGES = {"shapes32": 1, "shapes16": 2}  # lesson 11's resolution pair: the shapes images pooled by this factor
SHAPES_TRAIN = 20_000  # a fixed training set of shapes images (lesson 7's generator, train split, seed 0)
DATASETS = tuple(MIXTURES) + tuple(sorted(TOY_2D)) + ("digits", "digits_duplicated", "captions") + tuple(SHAPES_IMAGES) + ("shapes_latents", "reaching", "notes")
COND_DIMS = {"reaching": 2}  # data whose condition is a vector of numbers (lesson 15: the observation), not a label
DEMONSTRATIONS = 200  # lesson 15's expert episodes (course_lib.reaching.demonstrations, seed 0): 12,000 chunks
CAPTION_CORPUS = 20_000  # lesson 10's training captions: a fixed corpus, so "unseen" captions mean something


def shapes_images(n: int, name: str = "shapes32", split: str = "train", seed: int = 0) -> torch.Tensor:
    """n shapes images (lesson 7's generator) at the resolution of `name` ("shapes32", or "shapes16": 2x2 averages)."""
    from .shapes import make_shapes

    if name not in SHAPES_IMAGES:
        raise ValueError(f"unknown shapes resolution {name!r}; choose one of {sorted(SHAPES_IMAGES)}")
    images = make_shapes(n, split, seed)[0]
    factor = SHAPES_IMAGES[name]
    return torch.nn.functional.avg_pool2d(images, factor) if factor > 1 else images


def shapes_latents(n: int = SHAPES_TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """Lesson 7's latent-diffusion training pairs (text2image.train_text_to_image's): the shipped autoencoder's
    posterior means of the shapes train split (seed 0) times its scale factor, and the captions' token ids."""
    from .checkpoints import load_model, shipped_dir
    from .shapes import make_shapes, tokenize

    ae = load_model(shipped_dir() / "shapes_ae.pt")  # as autoencoder.load_autoencoder (which imports this module)
    images, captions, _ = make_shapes(n, "train", 0)
    with torch.no_grad():
        means = torch.cat([ae.model.encode(images[i:i + 500])[0] for i in range(0, len(images), 500)])
    return means * float(ae.card["scale_factor"]), tokenize(list(captions))


@functools.lru_cache(maxsize=1)
def _reaching_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Lesson 15's training pairs (built once per process: the expert's episodes are a Python loop)."""
    from .reaching import demonstrations, normalise_chunks

    demos = demonstrations(DEMONSTRATIONS, seed=0)
    return normalise_chunks(demos["chunks"]), demos["observations"]


class DataSource:
    """Batches of training data drawn with the trainer's generator: fresh points for 2D, resampled images for digits,
    resampled caption token rows for captions (lesson 10); with labels where the data has them (the digit; a mixture
    point's mode), else None."""

    def __init__(self, name: str):
        self.name = name
        self.num_classes = None
        self.cond_dim = COND_DIMS.get(name)
        if name in MIXTURES:
            self.mixture = MIXTURES[name]()
            self.num_classes = len(self.mixture.modes)  # the label of a point is its mode
        if name == "digits":
            self.images, self.labels = digits_split("train")
            self.num_classes = 10
        if name == "digits_duplicated":  # lesson 14: some digits repeated 10 or 100 times (duplicated_digits)
            rows = duplicated_digits()
            self.images, self.labels, self.num_classes = rows["images"], rows["labels"], 10
        if name == "captions":  # token ids (n, MAX_WORDS) of lesson 7's grammar (course_lib.captions)
            from .captions import caption_corpus

            self.tokens, self.texts = caption_corpus(CAPTION_CORPUS, "train", seed=0)
        if name in SHAPES_IMAGES:  # unlabelled RGB images in [-1, 1], 32x32 or average-pooled to 16x16
            self.images = shapes_images(SHAPES_TRAIN, name, "train", seed=0)
        if name == "shapes_latents":  # lesson 7's training pairs: scaled latents (4, 8, 8) and their caption tokens
            self.images, self.tokens = shapes_latents()
        if name == "reaching":  # lesson 15: the expert's next moves as flat normalised chunks, the position as condition
            self.images, self.observations = (v.clone() for v in _reaching_pairs())

    @property
    def shape(self) -> tuple:
        if self.name == "captions":
            return tuple(self.tokens.shape[1:])
        if self.name == "notes":
            from .audio import LENGTH

            return (1, LENGTH)
        return tuple(self.images.shape[1:]) if hasattr(self, "images") else (2,)

    def sample(self, n: int, generator: torch.Generator):
        if self.name in ("digits", "digits_duplicated"):
            idx = torch.randint(len(self.images), (n,), generator=generator)
            return self.images[idx], self.labels[idx]
        if self.name in SHAPES_IMAGES:
            return self.images[torch.randint(len(self.images), (n,), generator=generator)], None
        if self.name == "shapes_latents":  # the caption tokens in place of labels
            idx = torch.randint(len(self.images), (n,), generator=generator)
            return self.images[idx], self.tokens[idx]
        if self.name == "notes":  # lesson 15: fresh synthetic notes (course_lib.audio), unlabelled
            from .audio import make_notes

            return make_notes(n, generator), None
        if self.name == "reaching":  # the observation in place of labels
            idx = torch.randint(len(self.images), (n,), generator=generator)
            return self.images[idx], self.observations[idx]
        if self.name == "captions":
            return self.tokens[torch.randint(len(self.tokens), (n,), generator=generator)], None
        if self.name in MIXTURES:
            return self.mixture.sample(n, generator, return_labels=True)  # the same draws as without labels
        return TOY_2D[self.name](n, generator=generator).float(), None
