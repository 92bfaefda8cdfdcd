"""Figures: loss curves and digit grids, shared by training (MLflow artifacts) and aggregate (results/)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

LOSS_TERMS = ("loss", "bce", "nll", "kl")


def digit_grid(images: torch.Tensor, nrow: int, title: str = "") -> Figure:
    """Images (N x 784 or N x 28 x 28, values in [0, 1]) tiled row by row, nrow images per row."""
    images = images.detach().cpu().reshape(-1, 28, 28)
    rows = (len(images) + nrow - 1) // nrow
    canvas = torch.zeros(rows * 28, nrow * 28)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        canvas[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28] = image
    fig, ax = plt.subplots(figsize=(nrow * 0.5, rows * 0.5 + (0.3 if title else 0)))
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def loss_curves(histories: dict[str, list[dict[str, float]]], title: str = "") -> Figure:
    """Train (solid) and validation (dashed) total loss per epoch, one colour per labelled history."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (label, rows) in enumerate(histories.items()):
        epochs = [row["epoch"] for row in rows]
        ax.plot(epochs, [row["train_loss"] for row in rows], color=f"C{i}", label=f"{label} train")
        ax.plot(epochs, [row["val_loss"] for row in rows], color=f"C{i}", linestyle="--", label=f"{label} validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per sample")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_figure(figure: Figure, path: Path) -> None:
    """Write a figure to a file (folders made as needed) and free it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
