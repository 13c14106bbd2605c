"""FLOPs per conv and dense layer, read off the model's channel graph.

A FLOP here is one multiply or one add: a layer costs 2 x its multiply-accumulates,
2 * output elements * (kernel taps * input channels per group), for one image.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from graycnn import nnx_adapter
from graycnn.graph.trace import dtype_of, shape_of, trace


def count_flops(
    model: nn.Module, variables_or_shapes: Mapping[str, Any], input_shape: Sequence[int]
) -> dict[str, Any]:
    """FLOPs of one image's forward pass, per layer and in total.

    Args:
        model: The architecture, linen or NNX; conv widths are read off the tree, so the
            original module counts a merged tree.
        variables_or_shapes: The tree, as arrays or jax.ShapeDtypeStruct leaves; for an
            nnx.Module, an nnx.State or None (its own state).
        input_shape: (N, H, W, C) of the images; N is ignored (one image is counted).

    Returns:
        {'total': int, 'per_layer': {module path: int}}, layers in forward order.

    Example:
        >>> count_flops(model, variables, (1, 32, 32, 3))["per_layer"]["stem"]
        1990656
    """
    model, variables_or_shapes, _ = nnx_adapter.adapt(model, variables_or_shapes)
    shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(shape_of(x), dtype_of(x)), dict(variables_or_shapes)
    )
    return trace(model, shapes, input_shape).flops()
