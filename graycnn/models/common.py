"""Pieces shared by the model definitions."""

import jax

# Keras's BatchNormalization uses epsilon 1e-3 (the study's models); the momentum of the
# running statistics is Flax's default, so that re-estimation converges in few batches.
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.9

# Output-width overrides as ((conv path, width), ...): a tuple, so modules stay hashable.
Widths = tuple[tuple[str, int], ...]


def width_of(widths: Widths, path: str, default: int) -> int:
    """Returns the overridden output width of the conv at `path`, else `default`."""
    return dict(widths).get(path, default)


def scale_input(x: jax.Array, scale: float, offset: float) -> jax.Array:
    """Maps 0-255 pixels to the model's input range: (x - offset) * scale, as float32."""
    x = x.astype("float32")
    if offset:
        x = x - offset
    if scale != 1.0:
        x = x * scale
    return x
