"""Gray fold and filter merging as exact transforms of Flax variable trees.

Every transform takes variables and returns new variables; nothing is mutated. The
consumers of a conv's channels (later convs through concatenations, BatchNorms, residual
adds, the head) are found by tracing the model's jaxpr, so this works for the project's
models and for a user's own Flax CNN.

Example:
    >>> gray = fold_to_gray(model, variables, "sum", input_shape=(1, 32, 32, 3))
    >>> merged = merge_layer(model, gray, 1, labels, input_shape=(1, 32, 32, 1))
    >>> config = ModelConfig("densenet_seed", in_channels=1,
    ...                      widths=widths_of(model, merged, (1, 32, 32, 1)))
    >>> count_flops(model, merged, (1, 32, 32, 1))["total"]
"""

from graycnn.merge.flops import count_flops
from graycnn.merge.fold import (
    FOLD_METHODS,
    LUMA_WEIGHTS,
    fit_gray_coefficients,
    fold_to_gray,
    input_transform,
)
from graycnn.merge.merge import (
    BN_RULES,
    check_labels,
    merge_batchnorm,
    merge_layer,
    merge_layers,
)
from graycnn.merge.rebuild import Rebuilt, rebuild, widths_of
from graycnn.merge.trace import ChannelGraph, Segment, Use, check_variables, trace_channels

__all__ = [
    "BN_RULES",
    "FOLD_METHODS",
    "LUMA_WEIGHTS",
    "ChannelGraph",
    "Rebuilt",
    "Segment",
    "Use",
    "check_labels",
    "check_variables",
    "count_flops",
    "fit_gray_coefficients",
    "fold_to_gray",
    "input_transform",
    "merge_batchnorm",
    "merge_layer",
    "merge_layers",
    "rebuild",
    "trace_channels",
    "widths_of",
]
