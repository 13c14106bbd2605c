"""FLOPs per conv and dense layer, read off the model's jaxpr.

A FLOP here is one multiply or one add: a layer costs 2 x its multiply-accumulates,
2 * output elements * (kernel taps * input channels per group), for one image. Only
convs and dense layers are counted (BatchNorm, activations and pooling are a few
percent of a CNN's cost and are left out, as in the usual parameter/FLOP tables).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from graycnn.merge.trace import _dtype, prepare, shape_of, trace_unchecked


def count_flops(
    model: nn.Module, variables_or_shapes: Mapping[str, Any], input_shape: Sequence[int]
) -> dict[str, Any]:
    """FLOPs of one image's forward pass, per layer and in total.

    Args:
        model: The architecture; conv widths are read off the tree, so the original
            module counts a merged tree.
        variables_or_shapes: The tree, as arrays or jax.ShapeDtypeStruct leaves.
        input_shape: (N, H, W, C) of the images; N is ignored (one image is counted).

    Returns:
        {'total': int, 'per_layer': {module path: int}}, layers in forward order.

    Example:
        >>> count_flops(model, variables, (1, 32, 32, 3))["per_layer"]["stem"]
        1990656
    """
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (N, H, W, C), got {tuple(input_shape)}")
    shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(shape_of(x), _dtype(x)), dict(variables_or_shapes)
    )
    one = (1, *input_shape[1:])
    model = prepare(model, shapes, one)
    layers = trace_unchecked(model, shapes, one).layers
    per_layer = {path: int(op.flops) for path, op in layers.items()}
    return {"total": sum(per_layer.values()), "per_layer": per_layer}
