"""The channel graph of a Flax model: where each conv's output channels go.

Traced once per architecture from the model's jaxpr (`trace`), it is what the fold, the
merge, the FLOP count and BN-only training read about a model's structure. See
`graycnn.graph.trace` for what is followed, `graycnn.graph.rebuild` for running a
tree whose convs were narrowed, and `graycnn.graph.capture` for how module calls are
seen (the library's one interception, linen and NNX). Every function here takes a linen
module with its variables, or an nnx.Module with an nnx.State or None (see
`graycnn.nnx_adapter`).

An op the tracer does not follow is refused by name; `register_rule(primitive, rule)`
adds it to the per-primitive rule table ('elementwise', 'channelwise' or a function),
as Torch-Pruning's `register_customized_layer` does for a layer; a Flax module class
registered the same way is traced as one op.

Example:
    >>> g = trace(model, variables, (1, 32, 32, 3))
    >>> g.consumers("stem"), g.flops()["total"], g.conv_order[0]
"""

from graycnn.graph.flops import count_flops
from graycnn.graph.rebuild import Rebuilt, rebuild, unwrap, widths_of, with_widths
from graycnn.graph.rules import RULE_KINDS, register_rule
from graycnn.graph.trace import (
    ChannelGraph,
    call_kwargs,
    check_finite,
    check_variables,
    dtype_of,
    shape_of,
    trace,
)
from graycnn.graph.values import FirstOp, LayerOp, Segment, Use, like_leaf, module_of

__all__ = [
    "ChannelGraph",
    "FirstOp",
    "LayerOp",
    "RULE_KINDS",
    "Rebuilt",
    "Segment",
    "Use",
    "call_kwargs",
    "check_finite",
    "check_variables",
    "count_flops",
    "dtype_of",
    "like_leaf",
    "module_of",
    "rebuild",
    "register_rule",
    "shape_of",
    "trace",
    "unwrap",
    "widths_of",
    "with_widths",
]
