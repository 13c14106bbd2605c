"""Figures of receptive fields: PNG grids with the filter index on every tile.

`plot_receptive_fields` draws color fields (the study's Figure 4) or gray fields in a
blue-yellow pseudo-color map (Figure 5); `plot_color_and_gray` puts the color fields
and their BT.601 gray versions side by side (Figures 6-7). Figures are drawn on the Agg
canvas without pyplot, so no display is needed and no global backend is changed; PNGs
are written to a temp file in the same directory and renamed over the target.
`write_layer` writes what `experiments.visualize` gives for one layer.
"""

import math
import os
import typing
from typing import Any

import numpy as np
from matplotlib.figure import Figure, SubFigure

from graycnn.config import check_number
from graycnn.io import save_figure, write_atomically
from graycnn.receptive_field import ReceptiveFields, to_gray

_CELL = 0.8  # inches per tile
# Print resolution; the canvas grows with its square (at 10,000 a 36-tile grid would
# take gigabytes).
_MAX_DPI = 1200


def plot_receptive_fields(
    fields: Any,
    path: str | os.PathLike,
    title: str = "Receptive fields",
    *,
    indices: Any = None,
    cmap: str = "cividis",
    columns: int | None = None,
    dpi: float = 120,
) -> str:
    """One tile per filter, titled with its index.

    Args:
        fields: (F, H, W, 3) color in [0, 1], or (F, H, W) / (F, H, W, 1) gray, drawn
            with `cmap` on one scale shared by all tiles (their min to max), with a
            colorbar.
        path: PNG to write; parent directories are created.
        title: Figure title.
        indices: (F,) filter index of each tile; default 0..F-1.
        cmap: Colormap of gray fields; 'cividis' is the study's blue-yellow, and stays
            readable for color-blind viewers.
        columns: Tiles per row, 1..F; default near-square.
        dpi: Resolution, in [1, 1200].

    Returns:
        The path written.

    Raises:
        ValueError: naming the argument: fields of another shape or not finite,
            indices not (F,), columns or dpi out of range.
    """
    images, indices = _check(fields, indices)
    columns, dpi = _check_layout(columns, dpi, len(images))
    columns = columns or _columns(len(images))
    rows = math.ceil(len(images) / columns)
    figure = Figure(
        figsize=(0.4 + _CELL * columns + 0.6, 0.5 + _CELL * 1.15 * rows), layout="constrained"
    )
    _draw_grid(figure, images, indices, title, cmap, columns)
    return save_figure(figure, path, dpi)


def plot_color_and_gray(
    fields: Any,
    path: str | os.PathLike,
    title: str = "Receptive fields",
    *,
    indices: Any = None,
    cmap: str = "cividis",
    columns: int | None = None,
    dpi: float = 120,
) -> str:
    """Color fields (left) and their BT.601 gray versions in pseudo-color (right).

    Args:
        fields: (F, H, W, 3) in [0, 1].
        path, title, indices, cmap, columns, dpi: As for `plot_receptive_fields`.

    Returns:
        The path written.
    """
    images, indices = _check(fields, indices)
    columns, dpi = _check_layout(columns, dpi, len(images))
    if images.ndim != 4:
        raise ValueError(f"fields: side by side needs color (F, H, W, 3), got {images.shape}")
    gray = np.asarray(to_gray(images))[..., 0]
    columns = columns or _columns(len(images))
    rows = math.ceil(len(images) / columns)
    width = 0.4 + _CELL * columns
    figure = Figure(figsize=(2 * width + 0.8, 0.8 + _CELL * 1.15 * rows), layout="constrained")
    halves = figure.subfigures(1, 2, width_ratios=(width, width + 0.8))
    left, right = typing.cast(np.ndarray, halves)  # (2,) SubFigures
    _draw_grid(left, images, indices, "color", cmap, columns)
    _draw_grid(right, gray, indices, "gray (BT.601 luma)", cmap, columns)
    figure.suptitle(title, fontsize=10)
    return save_figure(figure, path, dpi)


def write_layer(
    result: ReceptiveFields, number: int, outdir: str, objective: str, **meta: Any
) -> list[str]:
    """Writes one layer's figures and raw fields to `outdir`, as `layer{number}_*`.

    Args:
        result: The layer's gradient ascent (fields (F, H, W, C) in [0, 1]).
        objective: Its objective's name, for the titles and the .npz.
        **meta: More scalars for the .npz (e.g. steps, seed).

    Returns:
        The files written: the gray grid; for color fields, the color grid and the two
        side by side; and the .npz (fields, gray, images, objective, filters, path, ...).
    """
    title = f"layer {number} ({result.path}), objective '{objective}'"
    prefix = os.path.join(outdir, f"layer{number}")
    gray = np.asarray(to_gray(result.fields))
    written = [plot_receptive_fields(gray, f"{prefix}_gray.png", f"Gray fields, {title}")]
    if result.fields.shape[-1] == 3:
        written += [
            plot_receptive_fields(result.fields, f"{prefix}_color.png", f"Fields, {title}"),
            plot_color_and_gray(result.fields, f"{prefix}_color_gray.png", title),
        ]
    arrays = dict(
        fields=result.fields,
        gray=gray,
        images=result.images,
        objective=result.objective,
        filters=result.filters,
        path=result.path,
        layer=number,
        objective_name=objective,
        **meta,
    )
    written.append(write_atomically(f"{prefix}.npz", lambda f: np.savez(f, **arrays)))
    return written


def _check(fields: Any, indices: Any) -> tuple[np.ndarray, np.ndarray]:
    """(F, H, W[, 1 | 3]) -> (F, H, W) gray or (F, H, W, 3) color, and (F,) indices."""
    images = np.asarray(fields, np.float64)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)) or not len(images):
        raise ValueError(
            f"fields: expected (F, H, W), (F, H, W, 1) or (F, H, W, 3) with F >= 1, "
            f"got shape {np.shape(fields)}"
        )
    if not np.all(np.isfinite(images)):
        raise ValueError("fields: non-finite values (NaN or inf)")
    indices = np.arange(len(images)) if indices is None else np.asarray(indices)
    if indices.shape != (len(images),):
        raise ValueError(f"indices: expected shape ({len(images)},), got {indices.shape}")
    return images, indices


def _check_layout(columns: Any, dpi: Any, count: int) -> tuple[int | None, float]:
    """columns None or an integer in 1..count (more would only add empty tiles, and
    a million of them would take minutes), dpi in [1, _MAX_DPI]."""
    if columns is not None:
        columns = check_number("columns", columns, integer=True, low=1, high=count)
    return columns, check_number("dpi", dpi, low=1, high=_MAX_DPI)


def _columns(n: int) -> int:
    """A near-square grid, preferring a column count that divides n (18 -> 6 x 3)."""
    root = math.sqrt(n)
    for columns in range(math.ceil(root), math.ceil(1.8 * root) + 1):
        if n % columns == 0:
            return columns
    return math.ceil(root)


def _draw_grid(
    figure: Figure | SubFigure,
    images: np.ndarray,
    indices: np.ndarray,
    title: str,
    cmap: str,
    columns: int,
) -> None:
    rows = math.ceil(len(images) / columns)
    axes = figure.subplots(rows, columns, squeeze=False)
    gray = images.ndim == 3
    if gray:
        # One scale for all tiles, stretched to the data for contrast (the study's reason
        # for pseudo-color), so brightness still compares across filters.
        vmin, vmax = images.min(), images.max()
    else:
        # imshow clips RGB to [0, 1]; rescale jointly so filters stay comparable.
        low, high = min(images.min(), 0.0), max(images.max(), 1.0)
        images = (images - low) / (high - low)
        vmin = vmax = None
    shown: Any = None
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(images):
            ax.set_axis_off()
            continue
        shown = ax.imshow(
            images[k], cmap=cmap if gray else None, vmin=vmin, vmax=vmax, interpolation="nearest"
        )
        ax.set_title(str(indices[k]), fontsize=7, pad=2)
    if gray:
        figure.colorbar(shown, ax=axes, fraction=0.04, pad=0.02, label="luma")
    figure.suptitle(f"{title} ({len(images)} filters)", fontsize=9)
