"""Figures of filter clusters: the distance matrix by cluster, and the filters by cluster.

`plot_clusters` reproduces the study's Figures 8-9 (receptive fields grouped by
cluster). Figures are drawn on the Agg canvas without pyplot, so no display is
needed and no global backend is changed; PNGs are written atomically.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from graycnn.cluster import renumber
from graycnn.io import save_figure


def _cluster_order(labels: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (labels renumbered 0..K-1, item order grouped by cluster)."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},) to match {n} items, got {labels.shape}")
    labels = renumber(labels)
    return labels, np.argsort(labels, kind="stable")


def plot_distance_matrix(
    distances: Any,
    labels: Any,
    path: str | os.PathLike,
    title: str = "Distance matrix ordered by cluster",
    *,
    cmap: str = "viridis",
    dpi: int = 120,
) -> str:
    """Heatmap of a distance matrix with items grouped by cluster.

    Rows and columns are reordered so that each cluster is a contiguous block
    (clusters in label order, items by index within one); white lines mark
    the cluster boundaries. Items are tick-labelled by index when N <= 60.

    Args:
      distances: (N, N) float.
      labels: (N,) cluster labels (any values; renumbered by first appearance).
      path: PNG file to write; parent directories are created.
      title: figure title.
      cmap: matplotlib colormap name.
      dpi: resolution of the PNG.

    Returns:
      The path written.
    """
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distances: expected a square (N, N) matrix, got shape {d.shape}")
    labels, order = _cluster_order(labels, d.shape[0])
    n = d.shape[0]
    size = 4.0 + min(n, 200) / 25.0
    figure = Figure(figsize=(size + 1.2, size))
    ax = figure.add_subplot()
    image = ax.imshow(d[np.ix_(order, order)], cmap=cmap, interpolation="nearest")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="distance")
    sizes = np.bincount(labels)
    for edge in np.cumsum(sizes)[:-1] - 0.5:
        ax.axhline(edge, color="white", linewidth=0.8)
        ax.axvline(edge, color="white", linewidth=0.8)
    if n <= 60:
        ax.set_xticks(range(n), [str(i) for i in order], fontsize=6, rotation=90)
        ax.set_yticks(range(n), [str(i) for i in order], fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("filter (grouped by cluster)")
    ax.set_title(f"{title}\n{n} filters, {len(sizes)} clusters", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path, dpi)


def _display_images(images: Any) -> tuple[np.ndarray, bool]:
    """(N, H, W[, 1 | 3]) -> images ready for imshow and whether they are gray."""
    array = np.asarray(images, dtype=np.float64)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 3 or (array.ndim == 4 and array.shape[-1] == 3)):
        raise ValueError(
            f"images: expected shape (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("images: non-finite values (NaN or inf)")
    gray = array.ndim == 3
    if not gray and (array.min() < 0 or array.max() > 1):
        # imshow clips RGB to [0, 1]; rescale jointly so filters stay comparable.
        span = array.max() - array.min()
        array = (array - array.min()) / (span if span > 0 else 1.0)
    return array, gray


def plot_clusters(
    images: Any,
    labels: Any,
    path: str | os.PathLike,
    title: str = "Filters grouped by cluster",
    *,
    cmap: str = "cividis",
    max_columns: int = 16,
    dpi: int = 120,
) -> str:
    """The filters grouped by cluster, one row per cluster (the study's Figures 8-9).

    Each cell shows one filter's image with its index as title; rows are
    labelled with the cluster number and size. Gray images share one color
    scale (the min and max over all images) so intensities compare across
    filters. A cluster larger than `max_columns` shows its first
    `max_columns - 1` filters and a "+k more" cell.

    Args:
      images: (N, H, W) gray, drawn with `cmap`, or (N, H, W, 3) color.
      labels: (N,) cluster labels (any values; renumbered by first appearance).
      path: PNG file to write; parent directories are created.
      title: figure title.
      cmap: colormap for gray images; the default blue-yellow 'cividis' stays
        readable for color-blind viewers.
      max_columns: most cells in a row, >= 2.
      dpi: resolution of the PNG.

    Returns:
      The path written.
    """
    array, gray = _display_images(images)
    if max_columns < 2:
        raise ValueError(f"max_columns must be >= 2, got {max_columns}")
    labels, _ = _cluster_order(labels, array.shape[0])
    clusters = [np.flatnonzero(labels == k) for k in range(int(labels.max()) + 1)]
    columns = min(max(len(c) for c in clusters), max_columns)
    rows = len(clusters)
    cell = 0.9
    figure = Figure(figsize=(1.2 + cell * columns, 0.6 + cell * 1.15 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    # Gray images share one color scale so that intensities compare across filters.
    scale = {"cmap": cmap, "vmin": array.min(), "vmax": array.max()} if gray else {}
    for row, members in enumerate(clusters):
        _draw_cluster(axes[row], array, members, scale)
        axes[row, 0].set_ylabel(
            f"c{row} ({len(members)})", fontsize=7, rotation=0, ha="right", va="center"
        )
    figure.suptitle(f"{title}: {array.shape[0]} filters, {rows} clusters", fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path, dpi)


def _draw_cluster(axes: Any, array: np.ndarray, members: np.ndarray, scale: dict) -> None:
    """One cluster's row of cells: its filters (each titled with its index), and where
    it has more than the row holds, its first ones and a "+k more" cell."""
    columns = len(axes)
    shown = members if len(members) <= columns else members[: columns - 1]
    for col, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if col < len(shown):
            ax.imshow(array[shown[col]], **scale)
            ax.set_title(str(shown[col]), fontsize=7, pad=2)
        elif col == len(shown) and len(shown) < len(members):
            more = f"+{len(members) - len(shown)}\nmore"
            ax.text(0.5, 0.5, more, ha="center", va="center", fontsize=7)
            ax.set_frame_on(False)
        else:
            ax.set_axis_off()
