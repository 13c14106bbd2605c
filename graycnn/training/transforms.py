"""What a step does to a batch of pixels, inside jit: the color/gray views and seeded
augmentation (re-exported by `graycnn.training.data`)."""

import dm_pix
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

VIEWS = ("color", "gray", "gray3")


def view_channels(view: str) -> int:
    """Input channels a model needs for `view`."""
    _check_view(view)
    return 1 if view == "gray" else 3


def apply_view(images: ArrayLike, view: str) -> jax.Array:
    """Converts pixels to a view, keeping the 0-255 range.

    Args:
        images: (N, H, W, C) uint8 or float, C in {1, 3}.
        view: 'color' (C=3), 'gray' (BT.601 luma, 1 channel) or 'gray3' (luma on 3 channels).

    Returns:
        (N, H, W, 3 or 1) float32.
    """
    _check_view(view)
    x = jnp.asarray(images, jnp.float32)
    channels = x.shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {x.shape}")
    if view == "color":
        if channels != 3:
            raise ValueError(f"view 'color' needs 3-channel images, got shape {x.shape}")
        return x
    # dm-pix's rec601 weights (0.2989, 0.5870, 0.1140) are tf.image.rgb_to_grayscale's,
    # which the study used; luma is linear, so the 0-255 range needs no rescaling.
    gray = dm_pix.rgb_to_grayscale(x) if channels == 3 else x
    return jnp.repeat(gray, 3, axis=-1) if view == "gray3" else gray


def augment(rng: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """Random crop after `pad`-pixel zero padding, and random horizontal flip, per image.

    Args:
        rng: PRNG key.
        images: (N, H, W, C).

    Returns:
        (N, H, W, C), same dtype.
    """
    n, h, w, _ = images.shape
    crop_rng, flip_rng = jax.random.split(rng)
    offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_rng, 0.5, (n,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; views: {VIEWS}")
