"""Figures: loss curves, digit grids and latent scatters, shared by training (MLflow artifacts) and the
stages that write results/."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from digitgen.files import write_atomic  # noqa: E402
from digitgen.models import noise_dim  # noqa: E402

LOSS_TERMS = ("loss", "bce", "nll", "kl")


def tile(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """Images (N x 784 or N x 28 x 28) as one canvas of 28-pixel tiles, row by row, nrow per row (blank fill)."""
    images = images.detach().cpu().reshape(-1, 28, 28)
    rows = (len(images) + nrow - 1) // nrow
    canvas = torch.zeros(rows * 28, nrow * 28)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        canvas[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28] = image
    return canvas


def digit_grid(
    images: torch.Tensor,
    nrow: int,
    title: str = "",
    *,
    col_labels: list[str] | None = None,
    row_labels: list[str] | None = None,
    xlabel: str = "",
    ylabel: str = "",
) -> Figure:
    """Images (N x 784 or N x 28 x 28, values in [0, 1]) tiled row by row, nrow images per row.

    col_labels / row_labels name the tiles' columns (below) and rows (left); xlabel / ylabel the axes.
    """
    canvas = tile(images, nrow)
    rows = canvas.shape[0] // 28
    margin_x = 0.4 if row_labels or ylabel else 0
    margin_y = (0.3 if title else 0) + (0.3 if col_labels or xlabel else 0)
    fig, ax = plt.subplots(figsize=(nrow * 0.5 + margin_x, rows * 0.5 + margin_y))
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([28 * c + 13.5 for c in range(len(col_labels or []))], col_labels or [], fontsize=7)
    ax.set_yticks([28 * r + 13.5 for r in range(len(row_labels or []))], row_labels or [], fontsize=7)
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def latent_scatter(points: torch.Tensor, digits: torch.Tensor, title: str = "") -> Figure:
    """2-D latent points (N x 2), one colour per digit."""
    points, digits = points.detach().cpu(), digits.detach().cpu()
    fig, ax = plt.subplots(figsize=(6, 5))
    for digit in range(10):
        chosen = points[digits == digit]
        ax.scatter(chosen[:, 0], chosen[:, 1], s=2, alpha=0.5, color=f"C{digit}", label=str(digit), rasterized=True)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(title, fontsize=9)
    ax.legend(title="digit", markerscale=5, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return fig


def png(figure: Figure) -> bytes:
    """A figure as PNG bytes, the figure freed: what a stage writes, with its other outputs, at the end."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150)
    plt.close(figure)
    return buffer.getvalue()


def save(figure: Figure, path: Path) -> Path:
    """Write a figure as PNG (parents created, atomically) and free it."""
    return write_atomic(path, png(figure))


def forest(panels: dict[str, list[tuple[str, float, float, float, bool]]], title: str, ylabel: str) -> Figure:
    """A forest plot, one panel per title: per row (label, estimate, interval low, high, separated) a dot and its
    interval, filled where separated, hollow where not; a line at 0, where the two sides do not differ."""
    columns = max(1, min(4, len(panels)))
    rows = max(1, (len(panels) + columns - 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.4 * rows + 0.6), squeeze=False)
    for ax, (panel_title, points) in zip(axes.flat, panels.items(), strict=False):
        for y, (_, estimate, low, high, separated) in enumerate(points):
            ax.errorbar(estimate, y, xerr=[[estimate - low], [high - estimate]], fmt="none", color="C0", capsize=3)
            ax.plot(estimate, y, "o", color="C0", markerfacecolor="C0" if separated else "white")
        ax.axvline(0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_yticks(range(len(points)), [label for label, *_ in points])
        ax.set_ylim(-0.5, len(points) - 0.5)
        ax.invert_yaxis()
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(panel_title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(5))
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if not panels:
        fig.text(0.5, 0.5, "nothing to compare", ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def temperature_curve(curves: dict[str, list[dict[str, float]]], trained: float, name: str) -> Figure:
    """Precision against recall (left) and FID (right) over the generating temperature, one line per seed, each point
    labelled with its temperature; the temperature the model draws at (`trained`) ringed. Against the validation
    images, where the temperature is chosen."""
    fig, (pr, fid) = plt.subplots(1, 2, figsize=(8, 3.4))
    for i, (seed, rows) in enumerate(curves.items()):
        temperatures = [row["temperature"] for row in rows]
        pr.plot([r["recall"] for r in rows], [r["precision"] for r in rows], "o-", color=f"C{i}", label=f"seed {seed}")
        fid.plot(temperatures, [r["fid"] for r in rows], "o-", color=f"C{i}", label=f"seed {seed}")
        for row in rows:
            if i == 0:
                pr.annotate(
                    f"{row['temperature']:g}",
                    (row["recall"], row["precision"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            if row["temperature"] == trained:
                pr.plot(row["recall"], row["precision"], "o", markersize=11, fillstyle="none", color="black")
                fid.plot(row["temperature"], row["fid"], "o", markersize=11, fillstyle="none", color="black")
    pr.set_xlabel("recall (coverage of real digits)")
    pr.set_ylabel("precision (realism)")
    fid.set_xlabel("temperature t")
    fid.set_ylabel("FID")
    for ax in (pr, fid):
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{name}: generating at temperature t, against the validation digits (ringed: t = {trained:g})", fontsize=9
    )
    fig.tight_layout()
    return fig


def _loss_axes(ax, histories: dict[str, list[dict[str, float]]], title: str) -> None:
    for i, (label, rows) in enumerate(histories.items()):
        epochs = [row["epoch"] for row in rows]
        ax.plot(epochs, [row["train_loss"] for row in rows], color=f"C{i}", label=f"{label} train")
        ax.plot(epochs, [row["val_loss"] for row in rows], color=f"C{i}", linestyle="--", label=f"{label} validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per sample")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def loss_curve_panels(panels: dict[str, dict[str, list[dict[str, float]]]], title: str = "") -> Figure:
    """One panel per model side by side (the study's Figures 3-6); in each, train (solid) and validation
    (dashed) loss per epoch, one colour per labelled history (seed)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False, sharey=True)
    for ax, (panel_title, histories) in zip(axes[0], panels.items(), strict=False):
        _loss_axes(ax, histories, panel_title)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def reconstruction_grid(model, images: torch.Tensor, digits: torch.Tensor) -> Figure:
    """Originals (top row) over the model's reconstructions from image + digit (bottom row)."""
    reconstructions, _ = model.reconstruct(images.reshape(len(images), -1), digits)
    return digit_grid(
        torch.cat([images.reshape(len(images), -1), reconstructions]),
        nrow=len(images),
        title="originals (top), reconstructions (bottom)",
    )


def generation_grid(model, seed: int) -> Figure:
    """10 x 10 digits generated from labels alone, one row per digit 0-9, style noise seeded."""
    digits = torch.arange(10).repeat_interleave(10)
    noise = torch.randn(len(digits), noise_dim(model), generator=torch.Generator().manual_seed(seed))
    return digit_grid(model.generate(digits, noise), nrow=10, title="generated from digits 0-9 (one row each)")
