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
