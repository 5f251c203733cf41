"""Plots the lessons share: image grids, 2D scatter over a density, and animations that render as HTML."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import animation


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def make_grid(images, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile (B, C, H, W) images in [-1, 1] into one (rows*H, cols*W[, 3]) array in [0, 1]."""
    x = _to_numpy(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (batch, 1 or 3, H, W), got {x.shape}")
    b, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.float32)
    x = np.clip((x + 1) / 2, 0, 1).transpose(0, 2, 3, 1)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return grid[..., 0] if c == 1 else grid


def image_grid(images, nrow: int | None = None, ax=None, title: str | None = None, value_range=(-1.0, 1.0),
               cmap: str = "gray", colorbar: bool = False, label: str | None = None):
    """Show (B, C, H, W) images as one grid; returns the axes.

    `value_range` (lo, hi) is mapped to black..white (default [-1, 1], the data range); pass a row's own range
    for signed fields such as predicted noise, with a diverging `cmap` and `colorbar=True`. `label` names the
    grid on its left (the ticks are hidden, not the axis, so a label set later shows too)."""
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range!r}")
    ax = ax or plt.subplots(figsize=(4, 4))[1]
    scaled = (_to_numpy(images) - lo) / (hi - lo) * 2 - 1  # make_grid maps [-1, 1] to [0, 1]
    grid = make_grid(scaled, nrow)
    im = ax.imshow(grid, cmap=cmap if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if colorbar:
        bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        bar.set_ticks([0, 0.5, 1])
        bar.set_ticklabels([f"{lo:.3g}", f"{(lo + hi) / 2:.3g}", f"{hi:.3g}"])
    if label:
        ax.set_ylabel(label)
    if title:
        ax.set_title(title)
    return ax


def image_rows(rows, labels, title: str | None = None, value_range=(-1.0, 1.0), width: float = 9.0,
               row_height: float = 0.9, label_size: int = 8):
    """One row of images per entry of `rows` ((B, C, H, W) each), named on its left by `labels`; returns the figure.
    For grids whose rows mean something (a label asked for, a noise level, a sampler)."""
    if len(rows) != len(labels) or not rows:
        raise ValueError(f"need one label per row and at least one row, got {len(rows)} rows and {len(labels)} labels")
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, row_height * len(rows) + (0.4 if title else 0)),
                             squeeze=False)
    for ax, imgs, label in zip(axes[:, 0], rows, labels):
        image_grid(imgs, nrow=len(imgs), ax=ax, value_range=value_range, label=str(label))
        ax.yaxis.label.set(rotation=0, ha="right", va="center", fontsize=label_size)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def scatter_2d(points, ax=None, title: str | None = None, lim: float = 1.6, modes=None,
               density: bool = True, bins: int = 80, s: float = 2.0, color: str = "C0"):
    """2D points over a log-density histogram, with the true modes as crosses; labelled axes; returns the axes."""
    p = _to_numpy(points)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {p.shape}")
    ax = ax or plt.subplots(figsize=(4, 4))[1]
    if density:
        h, xe, ye = np.histogram2d(p[:, 0], p[:, 1], bins=bins, range=[[-lim, lim], [-lim, lim]])
        ax.imshow(np.log1p(h.T), origin="lower", extent=[-lim, lim, -lim, lim], cmap="Blues", aspect="equal")
    ax.scatter(p[:, 0], p[:, 1], s=s, alpha=0.35, color=color, linewidths=0)
    if modes is not None:
        m = _to_numpy(modes)
        ax.scatter(m[:, 0], m[:, 1], marker="x", color="red", s=30, label="modes")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="$x_1$", ylabel="$x_2$", aspect="equal")
    if title:
        ax.set_title(title)
    return ax


def animate(frames: list, draw, interval: int = 120, figsize=(4, 4), dpi: int = 72):
    """Build an animation: draw(ax, frame) is called for each frame on a cleared axes. Returns the FuncAnimation."""
    if len(frames) == 0:
        raise ValueError("animate needs at least one frame")
    fig, ax = plt.subplots(figsize=figsize, dpi=dpi)

    def update(i):
        ax.clear()
        draw(ax, frames[i])
        return []

    anim = animation.FuncAnimation(fig, update, frames=len(frames), interval=interval, blit=False)
    plt.close(fig)  # only the animation is shown, not a stray last frame
    return anim


def as_html(anim):
    """An animation as a self-contained JavaScript player that JupyterLab, Colab and nbviewer all show."""
    from IPython.display import HTML

    return HTML(anim.to_jshtml(default_mode="once"))


def captioned_images(images, captions, ncol: int = 4, width: float = 2.4, fontsize: int = 8, title: str | None = None):
    """Small RGB images in [-1, 1], each with its caption above it; returns the figure."""
    import textwrap

    n = len(images)
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(width * ncol, width * nrow * 1.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, cap in zip(axes.flat, images, captions):
        image_grid(img[None], nrow=1, ax=ax)
        ax.set_title("\n".join(textwrap.wrap(cap, 22)), fontsize=fontsize)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
