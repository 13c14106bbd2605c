"""Report figures: the data in color vs gray, accuracy vs size (compress), validation
accuracy per epoch (baselines), and pooled differences from the bar (pool)."""

import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from graycnn.io import save_figure
from graycnn.study.schema import Row
from graycnn.training import data


def plot_color_vs_gray(images: np.ndarray, path: str | os.PathLike, columns: int = 3) -> str:
    """The study's Figure 1: a grid of images in color (left) and BT.601 gray (right).

    Args:
        images: (N, H, W, 3) uint8; the first columns**2 are shown.
    """
    images = images[: columns * columns]
    gray = np.asarray(data.apply_view(images, "gray"))[..., 0]
    fig = Figure(figsize=(2 * columns + 0.5, columns + 0.6))
    grids = typing.cast(np.ndarray, fig.subfigures(1, 2))  # (2,) SubFigures
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


# A row's marker: color rows squares, the merge circles, each control its own.
_MARKERS = {None: "o", "random": "x", "prune_l1": "^", "refit": "D", "scratch": "v"}


def _marker(row: Row) -> str:
    return "s" if row.image_type == "color" else _MARKERS[row.control]


def plot_pareto(rows: Sequence[Row], path: str | os.PathLike) -> str:
    """Accuracy (%) against parameters (left) and FLOPs (right), validation and, where
    the rows have it, held-out accuracy (second row of panels): every row a point
    (color rows squares, controls open markers), one line per budget through its
    bar and merged rows, in order of size."""
    held = any(r.held_out is not None for r in rows)
    fig = Figure(figsize=(12, 4.6 * (2 if held else 1)))
    axes = fig.subplots(2 if held else 1, 2, squeeze=False)
    for line, (split, title) in enumerate(
        [("validation", "validation"), ("held_out", "held out")][: 2 if held else 1]
    ):
        for col, (size, label) in enumerate((("params", "parameters"), ("flops", "FLOPs"))):
            ax = axes[line, col]
            for i, r in enumerate(rows, start=1):
                result = getattr(r, split)
                if result is None:
                    continue
                marker = _marker(r)
                ax.scatter(
                    getattr(r, size),
                    100 * result.accuracy,
                    marker=marker,
                    s=36,
                    label=f"{i}. {r.name}" if (line, col) == (0, 0) else None,
                )
                ax.annotate(str(i), (getattr(r, size), 100 * result.accuracy), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
            for budget in sorted({r.budget for r in rows if r.budget}):
                chain = sorted(
                    (r for r in rows if r.budget == budget and not r.control),
                    key=lambda r: getattr(r, size),
                )
                points = [
                    (getattr(r, size), 100 * getattr(r, split).accuracy)
                    for r in chain
                    if getattr(r, split) is not None
                ]
                if points:
                    ax.plot(*zip(*points, strict=True), lw=1, alpha=0.7, label=(
                        f"budget: {budget}" if (line, col) == (0, 0) else None))  # fmt: skip
            ax.set_xlabel(label + (" (BatchNorm statistics included)" if size == "params" else
                                   " (one image)"))  # fmt: skip
            ax.set_ylabel(f"{title} accuracy (%)")
            ax.grid(alpha=0.3)
    fig.legend(loc="center left", bbox_to_anchor=(0.76, 0.5), fontsize=7, frameon=False)
    fig.subplots_adjust(right=0.74, wspace=0.25, hspace=0.3)
    return save_figure(fig, path)


def plot_speed(rows: Sequence[Row], batch_size: int, path: str | os.PathLike) -> str:
    """Validation accuracy (%) against measured images per second at `batch_size`: every
    timed row a point, numbered as in report.md, controls open markers."""
    fig = Figure(figsize=(8, 4.6))
    ax = fig.subplots()
    for i, r in enumerate(rows, start=1):
        if r.speed is None:
            continue
        point = (r.speed.images_per_second[batch_size], 100 * r.validation.accuracy)
        ax.scatter(*point, marker=_marker(r), s=36, label=f"{i}. {r.name}")
        ax.annotate(str(i), point, fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"measured images per second (batch {batch_size}, one device)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    fig.legend(loc="center left", bbox_to_anchor=(0.62, 0.5), fontsize=7, frameon=False)
    fig.subplots_adjust(right=0.6)
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


def plot_pooled(results: Sequence[tuple[str, Mapping[str, Any]]], path: str | os.PathLike) -> str:
    """One panel per split (validation, held out where given): each setting's pooled
    difference from the bar in points with its 95% interval, each workdir's own mean
    difference as open dots, and the bar at 0.

    Args:
        results: [(label, `compress.pool.compare_runs` result)], drawn top to bottom.
    """
    splits = [("validation", "validation")]
    if any(r["held_out"] is not None for _, r in results):
        splits.append(("held_out", "held out"))
    fig = Figure(figsize=(5 * len(splits) + 1.5, 1.2 + 0.45 * len(results)))
    axes = fig.subplots(1, len(splits), sharey=True, squeeze=False)[0]
    ys = np.arange(len(results))[::-1]
    for ax, (split, title) in zip(axes, splits, strict=True):
        for y, (_, res) in zip(ys, results, strict=True):
            r = res[split]
            if r is None:
                continue
            low, high = r["ci95"]
            ax.errorbar(r["delta"], y, xerr=[[r["delta"] - low], [high - r["delta"]]],
                        fmt="o", color="C0", capsize=3)  # fmt: skip
            ax.scatter(r["per_workdir"], [y] * len(r["per_workdir"]), marker="o",
                       facecolors="none", edgecolors="C1", s=22, zorder=3)  # fmt: skip
        ax.axvline(0, color="gray", lw=1, ls="--")
        ax.set_title(title)
        ax.set_xlabel(f"{results[0][1]['row']} - {results[0][1]['bar']} (points)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [label for label, _ in results])
    axes[0].set_ylim(-0.7, len(results) - 0.3)
    fig.suptitle("pooled difference, 95% interval (filled); each workdir's mean (open)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
