"""Conv layers numbered 1..N in forward order, as the study counts them.

Layer 1 of the DenseNet is the stem, layer 2 the first dense layer's conv, layer 14 the
first conv of block 2. A layer is addressed by that number or by its module path, the
path of its kernel without the `params/` prefix and `/kernel` suffix (e.g.
`block1/layer1/conv`). The order is read by capturing every `nn.Conv` call during an
abstract run (`graycnn.graph.capture`), so it works for any Flax model, not only the
project's. For an `nnx.Module` the path is the attribute path of each `nnx.Conv`
(`blocks/0/conv`), and the order is that of their `__call__`s. `conv_layers` is the one
source of these numbers: the tracer's `ChannelGraph.conv_order` is its result.
"""

import functools
import numbers
import typing
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from graycnn import nnx_adapter
from graycnn.graph import capture

LayerRef = int | str
layer_output_fn = capture.layer_output_fn


def conv_layers(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Returns the module paths of every nn.Conv in the order the forward pass calls them.

    Args:
        model: A Flax module whose `__call__(x)` takes images: linen, or NNX (its
            nnx.Convs, in eval mode).
        input_shape: (N, H, W, C) of a dummy input; only shapes are traced.
    """
    model, shape = nnx_adapter.adapt_model(model), tuple(int(s) for s in input_shape)
    try:
        hash(model)
    except TypeError:  # A module with unhashable attributes: run without the cache.
        return list(_conv_order.__wrapped__(model, shape))
    return list(_conv_order(model, shape))


# Models are hashable by value: the tracer, rebuild and the ascent ask once per shape.
@functools.lru_cache(maxsize=64)
def _conv_order(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[str, ...]:
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    return tuple(capture.capture(model, None, x, select=nnx_adapter.CONVS))


def resolve_layer(layer: LayerRef, paths: Sequence[str]) -> str:
    """Returns the conv path for a layer number (1-based) or path.

    Args:
        layer: 1..N (a Python or NumPy integer, or a string of digits), or a path;
            `params/` prefix and `/kernel` suffix are accepted. A bool or a float (even
            1.0) is refused: a layer number that went through float arithmetic or a
            truth value is a mistake in the caller, not a layer.
        paths: The output of `conv_layers`.

    Raises:
        ValueError: naming the layer and listing the layers that exist.
    """
    listing = ", ".join(f"{i}:{p}" for i, p in enumerate(paths, start=1))
    if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (str, numbers.Integral)):
        raise ValueError(
            f"layer must be a conv number 1..{len(paths)} or a conv path, got {layer!r} "
            f"({type(layer).__name__}); layers: {listing}"
        )
    if isinstance(layer, str) and layer.strip().isdigit():
        layer = int(layer)
    if isinstance(layer, numbers.Integral):
        layer = int(layer)
        if not 1 <= layer <= len(paths):
            raise ValueError(
                f"layer {layer} does not exist: the model has conv layers 1..{len(paths)} "
                f"({listing})"
            )
        return paths[layer - 1]
    path = typing.cast(str, layer).removeprefix("params/").removesuffix("/kernel")
    if path not in paths:
        raise ValueError(f"layer {layer!r} is not a conv layer of the model; layers: {listing}")
    return path


def layer_number(path: str, paths: Sequence[str]) -> int:
    """The 1-based number of the conv at `path`."""
    return list(paths).index(resolve_layer(path, paths)) + 1
