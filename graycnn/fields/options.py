"""`gradient_ascent`'s arguments checked before any work, each error naming the argument.

The ascent (`graycnn.receptive_field`) runs for minutes; a misspelt objective, a step
count that overflows an int32 counter or an image its layers reduce to nothing should
fail at once, with one line that says which argument and what its rule is.
"""

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from graycnn.config import check_number
from graycnn.graph import capture
from graycnn.graph.trace import check_variables
from graycnn.tree import flatten, unflatten

OBJECTIVES = ("mean", "center", "kernel")
LOOPS = ("auto", "python", "fori")
# Steps and seeds feed int32 loop counters and jax.random.key.
_MAX_INT32 = 2**31 - 1


def renamed_image_shape(image_shape: Any, input_shape: Any) -> Any:
    """`image_shape`, or the deprecated `input_shape` (H, W, C) with a warning."""
    if input_shape is None:
        if image_shape is None:
            raise ValueError("image_shape (H, W, C) of the images the model takes is required")
        return image_shape
    warnings.warn(
        "gradient_ascent(input_shape=(H, W, C)) is now image_shape=; elsewhere in graycnn "
        "input_shape is (N, H, W, C)",
        DeprecationWarning,
        stacklevel=3,
    )
    return input_shape if image_shape is None else image_shape


def check_options(*, image_shape: Sequence[int], prefix: str = "", **options: Any) -> dict:
    """Checks `gradient_ascent`'s options before any work; returns them normalized.

    The rules: objective and loop from their lists; steps and seed integers in
    0..2**31-1 (int32 counters, jax.random.key); step_size > 0; noise_scale,
    tv_weight >= 0; noise_offset any finite number; jitter an integer and blur_sigma a
    number in [0, max(H, W)] (a longer shift wraps around the image, a wider blur
    flattens every field, and its kernel, 4 sigma wide, would outgrow memory);
    chunk_size and memory_bytes None or integers >= 1. Values that pass these but
    still make the ascent overflow are caught after it (`gradient_ascent` raises).

    Args:
        image_shape: (H, W, C), each an integer >= 1.
        prefix: Put before each option's name in the message: '--' for a CLI, whose
            flags carry the options' names.
        **options: Any of objective, loop, steps, step_size, seed, noise_scale,
            noise_offset, jitter, blur_sigma, tv_weight, chunk_size, memory_bytes.

    Returns:
        The options given, numbers as int or float, and image_shape as (H, W, C) ints.

    Raises:
        ValueError: one line naming the option (with `prefix`) and its rule.
    """
    h, w, c = _check_image_shape(image_shape)
    rules = _rules(h, w)
    checked: dict[str, Any] = {"image_shape": (h, w, c)}
    for name, value in options.items():
        if name in ("objective", "loop"):
            choices = OBJECTIVES if name == "objective" else LOOPS
            if value not in choices:
                raise ValueError(f"unknown {prefix}{name} {value!r}; choose from {choices}")
            checked[name] = value
        elif name not in rules:
            raise TypeError(f"check_options: unknown option {name!r}")
        elif value is None and name in ("chunk_size", "memory_bytes"):
            checked[name] = None
        else:
            checked[name] = check_number(prefix + name, value, **rules[name])
    return checked


def _check_image_shape(image_shape: Any) -> tuple[int, int, int]:
    shape: object
    try:
        shape = tuple(image_shape)
    except TypeError:
        shape = image_shape
    if not isinstance(shape, tuple) or len(shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {shape!r}")
    try:
        h, w, c = (check_number("image_shape", s, integer=True, low=1) for s in shape)
    except ValueError:
        raise ValueError(f"image_shape must be (H, W, C), integers >= 1, got {shape!r}") from None
    return h, w, c


def _rules(h: int, w: int) -> dict[str, dict[str, Any]]:
    """`check_number`'s arguments for each numeric option of an (h, w) image."""
    size = max(h, w)
    return {
        "steps": dict(integer=True, low=0, high=_MAX_INT32),
        "seed": dict(integer=True, low=0, high=_MAX_INT32),
        "step_size": dict(positive=True),
        "noise_scale": dict(low=0),
        "noise_offset": {},
        "tv_weight": dict(low=0),
        "jitter": dict(
            integer=True, low=0, high=size,
            why=f" (pixels: a longer shift wraps around the {h}x{w} image)",
        ),
        "blur_sigma": dict(
            low=0, high=size, why=f" (pixels: a wider blur flattens every {h}x{w} field)"
        ),
        "chunk_size": dict(integer=True, low=1),
        "memory_bytes": dict(integer=True, low=1),
    }  # fmt: skip


def check_filters(filters: Any, num_filters: int, path: str) -> np.ndarray:
    """(F,) int32 filter indices, F >= 1, each in [0, num_filters) of the conv `path`."""
    array = np.asarray(filters)
    if array.ndim != 1 or not len(array):
        raise ValueError(
            f"filters must be a non-empty list of indices in [0, {num_filters}) of {path}, "
            f"got {np.asarray(filters).tolist()!r}"
        )
    if not (np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, bool)):
        raise ValueError(f"filters must be integer indices of {path}, got dtype {array.dtype}")
    if not np.all((array >= 0) & (array < num_filters)):
        raise ValueError(f"filters must be indices in [0, {num_filters}) of {path}: {array}")
    return array.astype(np.int32)


def check_fit(model: Any, variables: Any, shape: tuple[int, ...]) -> None:
    """Raises ValueError naming image_shape unless the model runs on `shape` with these
    variables (the same paths and shapes as its init makes)."""
    leaves = tuple(
        (
            name,
            tuple(np.shape(leaf)),
            str(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype),
        )
        for name, leaf in sorted(flatten(variables).items())
    )  # hashable: the check traces the model once per architecture, shape and tree
    _check_fit_cached(model, leaves, shape)


@functools.lru_cache(maxsize=64)
def _check_fit_cached(model: Any, leaves: tuple, shape: tuple[int, ...]) -> None:
    hwc = shape[1:]
    capture.check_runs(model, shape)
    structs = unflatten({name: jax.ShapeDtypeStruct(s, d) for name, s, d in leaves})
    try:
        check_variables(model, structs, shape)
    except ValueError as e:
        raise ValueError(f"image_shape {hwc} does not fit the model's variables: {e}") from None
