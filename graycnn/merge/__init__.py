"""Merging a conv's filters by cluster labels, as an exact transform of Flax variables.

Every transform takes variables and returns new variables; nothing is mutated. The
consumers of a conv's channels (later convs through concatenations, BatchNorms, residual
adds, the head) come from the model's channel graph (`graycnn.graph`), so this works for
the project's models and for a user's own Flax CNN.

Example:
    >>> merged = merge_layer(model, gray, 1, labels, input_shape=(1, 32, 32, 1))
    >>> runnable = graph.rebuild(model, merged, (1, 32, 32, 1))
    >>> logits = runnable.apply(merged, images)
"""

from graycnn.merge.bn_rules import BN_RULES, merge_batchnorm
from graycnn.merge.merge import (
    MergePlan,
    PlanStep,
    check_labels,
    merge_layer,
    merge_layers,
    plan_merge,
    plan_prune,
)

__all__ = [
    "BN_RULES",
    "MergePlan",
    "PlanStep",
    "check_labels",
    "merge_batchnorm",
    "merge_layer",
    "merge_layers",
    "plan_merge",
    "plan_prune",
]

# Names that graycnn.merge exported before the channel graph and the fold left it: each
# still works, with a DeprecationWarning naming its new home, for one release.
_MOVED = {
    "count_flops": ("graycnn.graph", "count_flops"),
    "rebuild": ("graycnn.graph", "rebuild"),
    "Rebuilt": ("graycnn.graph", "Rebuilt"),
    "widths_of": ("graycnn.graph", "widths_of"),
    "ChannelGraph": ("graycnn.graph", "ChannelGraph"),
    "Segment": ("graycnn.graph", "Segment"),
    "Use": ("graycnn.graph", "Use"),
    "check_variables": ("graycnn.graph", "check_variables"),
    "trace_channels": ("graycnn.graph", "trace"),
    "fold_to_gray": ("graycnn.fold", "fold_to_gray"),
    "fit_gray_coefficients": ("graycnn.fold", "fit_gray_coefficients"),
    "input_transform": ("graycnn.fold", "input_transform"),
    "FOLD_METHODS": ("graycnn.fold", "METHODS"),
    "LUMA_WEIGHTS": ("graycnn.fold", "LUMA_WEIGHTS"),
}


def __getattr__(name: str):
    """The moved names (`_MOVED`), with a DeprecationWarning naming where they live now."""
    if name not in _MOVED:
        raise AttributeError(f"module 'graycnn.merge' has no attribute {name!r}")
    import importlib
    import warnings

    module, attr = _MOVED[name]
    warnings.warn(
        f"graycnn.merge.{name} moved to {module}.{attr}; import it from there",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), attr)
