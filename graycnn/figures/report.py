"""Report figures: the data in color vs gray, accuracy vs parameters (compress), and
validation accuracy per epoch (baselines)."""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from graycnn import data
from graycnn.io import save_figure


def plot_color_vs_gray(images: np.ndarray, path: str | os.PathLike, columns: int = 3) -> str:
    """The study's Figure 1: a grid of images in color (left) and BT.601 gray (right).

    Args:
        images: (N, H, W, 3) uint8; the first columns**2 are shown.
    """
    images = images[: columns * columns]
    gray = np.asarray(data.apply_view(images, "gray"))[..., 0]
    fig = Figure(figsize=(2 * columns + 0.5, columns + 0.6))
    grids = fig.subfigures(1, 2)
    for sub, title, stack, cmap in (
        (grids[0], "color", images, None),
        (grids[1], "gray (BT.601 luma)", gray, "gray"),
    ):
        sub.suptitle(title)
        axes = sub.subplots(columns, columns)
        for ax, im in zip(axes.flat, stack, strict=False):
            ax.imshow(im, cmap=cmap, vmin=0, vmax=255)
            ax.set_axis_off()
    return save_figure(fig, path)


def plot_accuracy_vs_params(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str:
    """Accuracy (%) against parameters: numbered points, named in the legend."""
    fig = Figure(figsize=(10, 4.8))
    ax = fig.add_subplot()
    for i, row in enumerate(rows, start=1):
        x, y = row["params"], 100 * row["accuracy"]
        marker = "s" if row["image_type"] == "color" else "o"
        ax.scatter(x, y, marker=marker, s=40, label=f"{i}. {row['name']} ({y:.1f}%)")
        ax.annotate(str(i), (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
    baseline = next((r for r in rows if r.get("baseline")), None)
    if baseline is not None:
        ax.axhline(
            100 * baseline["accuracy"], color="gray", ls="--", lw=0.8, label="gray + BN baseline"
        )
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel("parameters (BatchNorm statistics included)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_histories(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str:
    """Validation accuracy vs epoch, every row of one model overlaid."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for r in rows:
        if r["history"]:
            epochs = range(1, len(r["history"]) + 1)
            ax.plot(epochs, [100 * a for a in r["history"]], marker=".", label=r["name"])
        else:
            ax.axhline(100 * r["accuracy"], ls="--", color="gray", label=r["name"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(rows[0]["model"] if rows else "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
