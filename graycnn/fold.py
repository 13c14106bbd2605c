"""Folding the first conv from RGB to gray: a color model becomes a gray model.

The first conv's kernel W (kh, kw, 3, F) becomes sum_c w_c W[..., c, :] (kh, kw, 1, F);
the methods differ in the weights w and in what the gray model then computes:

* `sum` (w = 1, 1, 1; the study and timm's `adapt_input_conv`): exactly the color
  model fed the gray image replicated to 3 channels (the `gray3` view).
* `mean` (w = 1/3 each): the color model fed gray/3 on every channel, so the first
  conv's outputs are a third of `sum`'s. The running statistics of the BatchNorm after it
  no longer fit until they are re-estimated; useful only when that follows anyway.
* `luma` (w = BT.601 0.2989, 0.5870, 0.1140): the color model fed an image whose
  channel c is w_c * gray: outputs shrink as with `mean` (the weights sum to 1, so the
  scale is similar), and the channels' relative weights are distorted. Like `mean`, it
  needs BN re-estimation.
* `fit`: regress each color channel on gray over training images, x_c ~ a_c g + b_c
  (`fit_gray_coefficients`), and feed the color model that estimate: w = a, plus the
  constant b term. The model first computes T(p) = (p - offset) * scale, so channel c of
  the conv input is a_c T(g) + (T(b_c) - a_c T(0)); the constant c_c gives each output
  f the constant delta_f = sum_{c,h,w} c_c W[h, w, c, f]. The DenseNet and ResNet stems
  have no bias, so delta goes where it is exact: into the first op that reads the raw
  conv output, found by the tracer: a bias (`+ delta`) or every BatchNorm mean that
  subtracts it (DenseNet: the stem's slice of the mean of every BN in block 1 and of
  transition 1, through the concatenations; ResNet: the stem BN).

The padding subtlety of `fit`: the color model zero-pads T(x), the constant included,
so near the border of a SAME-padded first conv its real constant term covers only the
taps inside the image, while delta assumes all of them. The fold is exact for images on
the fitted lines everywhere a kernel sees no padding, and off by the missing taps' share
of delta on the border ring (1 pixel for a 3x3 kernel). With VALID padding it is exact.
"""

import typing
from collections.abc import Mapping, Sequence
from typing import Any

import dm_pix
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from graycnn import graph, nnx_adapter
from graycnn.graph import capture
from graycnn.tree import flatten, unflatten

METHODS = ("sum", "mean", "luma", "fit")
# dm-pix's rgb_to_grayscale weights, which data.apply_view uses for the gray view.
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)
_WEIGHTS = {"sum": np.ones(3), "mean": np.full(3, 1 / 3), "luma": np.array(LUMA_WEIGHTS)}


def fit_gray_coefficients(
    images: np.ndarray, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fit of each color channel on gray: x_c ~ a_c * g + b_c.

    Args:
        images: (N, H, W, 3) uint8, 0-255.
        batch_size: Images per chunk (bounds memory).

    Returns:
        (a, b), each (3,) float64, in 0-255 pixel space. As gray is linear in the
        channels, sum_c luma_c a_c = 1 and sum_c luma_c b_c = 0.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"images must be (N, H, W, 3) with N > 0, got shape {images.shape}")
    sums = np.zeros(4)  # n, sum g, sum g^2
    cross = np.zeros((2, 3))  # sum x_c, sum x_c g
    for start in range(0, len(images), batch_size):
        x = jnp.asarray(images[start : start + batch_size], jnp.float32)
        g = np.asarray(dm_pix.rgb_to_grayscale(x), np.float64).reshape(-1)
        x64 = np.asarray(x, np.float64).reshape(-1, 3)
        sums += [len(g), g.sum(), (g * g).sum(), 0.0]
        cross += [x64.sum(axis=0), g @ x64]
    n, sg, sgg, _ = sums
    var_g = sgg / n - (sg / n) ** 2
    if var_g <= 0:
        raise ValueError("images have constant gray values; the fit is undefined")
    a = (cross[1] / n - (sg / n) * cross[0] / n) / var_g
    b = cross[0] / n - a * sg / n
    return a, b


def fold_to_gray(
    model: nn.Module,
    variables: Mapping[str, Any],
    method: str = "sum",
    *,
    fit: tuple[np.ndarray, np.ndarray] | None = None,
    input_shape: Sequence[int],
) -> dict[str, Any]:
    """Returns new variables whose first conv reads one gray channel instead of RGB.

    Args:
        model: A color model (its first conv's kernel has 3 input channels), linen or
            NNX.
        variables: Its tree; not modified. For an nnx.Module, an nnx.State or None
            (the module's own state).
        method: 'sum', 'mean', 'luma' or 'fit' (see the module docstring).
        fit: (a, b) from `fit_gray_coefficients`; required by method 'fit'.
        input_shape: (N, H, W, 3) of the color images.

    Returns:
        The folded tree, for the same module fed (N, H, W, 1) gray images. For an
        nnx.Module: a new nnx.State if one was given, else a new nnx.Module whose first
        conv has in_features=1 (the given module is not modified).

    Raises:
        ValueError: unknown method, no `fit` for 'fit', a first conv that does not read
            3 channels, a constant that cannot be absorbed exactly, or a tree that does
            not match the model, naming the path.
    """
    if method not in METHODS:
        raise ValueError(f"unknown fold method {method!r}; methods: {METHODS}")
    input_shape = tuple(input_shape)
    if len(input_shape) != 4 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (N, H, W, 3) color images, got {input_shape}")
    model, variables, back = nnx_adapter.adapt(model, variables)
    g = graph.trace(model, variables, input_shape)
    model = g.model
    path = g.conv_order[0]
    op = g.layers.get(path)
    if op is None or op.kernel is None or op.in_axis is None:
        raise ValueError(f"layer 1 ({path!r}) is not a conv with a plain kernel leaf")
    flat = flatten(variables)
    kernel = np.asarray(flat[op.kernel], np.float64)
    if kernel.shape[op.in_axis] != 3:
        raise ValueError(
            f"{op.kernel} has {kernel.shape[op.in_axis]} input channels; folding needs 3"
        )
    weights = _fit_coefficients(fit)[0] if method == "fit" else _WEIGHTS[method]
    folded = np.tensordot(kernel, weights, axes=([op.in_axis], [0]))
    new = dict(flat)
    new[op.kernel] = graph.like_leaf(flat[op.kernel], np.expand_dims(folded, op.in_axis))
    if method == "fit":
        a, b = _fit_coefficients(fit)
        t0, t255 = input_transform(model, variables, input_shape, path)
        slope = (t255 - t0) / 255.0
        const = (t0 + slope * b) - a * t0  # T(b_c) - a_c T(0)
        delta = np.tensordot(kernel, const, axes=([op.in_axis], [0]))
        delta = delta.sum(axis=tuple(range(delta.ndim - 1)))  # over the spatial taps
        _absorb_constant(g, new, path, delta)
    return back(unflatten(new))


def _fit_coefficients(fit: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, ...]:
    if fit is None:
        raise ValueError("method 'fit' needs fit=fit_gray_coefficients(train_images)")
    return tuple(np.asarray(v, np.float64).reshape(3) for v in fit)


def input_transform(
    model: nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int], path: str
) -> tuple[float, float]:
    """(T(0), T(255)): what the conv at `path` reads for images of constant pixels.

    Runs the model eagerly up to that conv only. Raises ValueError unless every channel
    sees the same value (a per-channel normalization cannot be folded into one gray
    channel by `fit`).
    """
    values = []
    for pixel in (0.0, 255.0):
        image = jnp.full((1, *input_shape[1:]), pixel, jnp.float32)
        calls = capture.capture(model, variables, image, {path}, stop=path)
        if path not in calls:
            raise ValueError(f"layer 1 ({path!r}) is never called on the images")
        x = np.asarray(calls[path].input, np.float64)
        center = x[0, x.shape[1] // 2, x.shape[2] // 2]
        if not np.allclose(center, center[0], rtol=1e-6, atol=1e-6):
            raise ValueError(
                f"layer 1 ({path!r}) sees {center.tolist()} for a constant pixel {pixel}: "
                "per-channel input normalization cannot be folded by 'fit'"
            )
        values.append(float(center[0]))
    return values[0], values[1]


def _absorb_constant(g: graph.ChannelGraph, new: dict[str, Any], path: str, delta) -> None:
    """Adds the per-filter constant `delta` to the conv's output, exactly, in `new`."""
    ops = [f for f in g.first_ops if f.source == path]
    bad = [f.primitive for f in ops if f.primitive not in ("add", "sub") or f.leaf is None]
    if not ops or bad:
        raise ValueError(
            f"method 'fit' needs layer 1 ({path!r}) to be read first by a bias add or a "
            f"BatchNorm mean subtraction; it is read by {bad or 'nothing'}"
        )
    done = set()
    for f in ops:
        if f.leaf in done:
            continue
        done.add(f.leaf)
        key, axis = typing.cast(str, f.leaf), typing.cast(int, f.leaf_axis)  # checked above
        # The gray conv output is the color one minus delta: x + bias needs bias + delta;
        # x - mean and mean - x need mean - delta.
        sign = 1.0 if f.primitive == "add" else -1.0
        leaf = np.asarray(new[key], np.float64)
        shift = np.zeros(leaf.shape[axis])
        pos = 0
        for seg in f.segments:
            if seg.source == path:
                shift[pos : pos + seg.length] = delta[seg.start : seg.start + seg.length]
            pos += seg.length
        shape = [1] * leaf.ndim
        shape[axis] = -1
        new[key] = graph.like_leaf(new[key], leaf + sign * shift.reshape(shape))
