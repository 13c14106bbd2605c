"""Merging a conv's output channels by cluster labels, as an exact tree transform.

For a conv whose F filters carry labels 0..K-1, `merge_layer` returns a tree where:

* the conv has K filters: each cluster's kernel (and bias) is the mean of its members',
  so the merged channel is the mean of the members' outputs;
* every consumer (a conv or dense kernel found by `graph.trace`, at the right offset
  inside a concatenation, also after a flatten) has the input slices of each cluster
  summed: a consumer of identical channels reads sum_i W_i h = (sum_i W_i) h;
* every per-channel vector between the conv and its consumers is merged per cluster:
  BatchNorm by `merge_batchnorm`, anything else (a conv bias) by the mean;
* a conv in a residual group (channels added to other convs' channels) is merged
  together with every conv of the group, with the same labels: the add needs channel i
  of each operand to stay channel i. This happens automatically.
* a grouped conv (feature_group_count G > 1) is merged within its groups: output
  channel k belongs to group k // (width / G), so every cluster must stay in one group
  and every group keep as many channels; the plan renumbers the clusters group by group.

Refused at plan time, naming the conv, module or leaf: a leaf axis read with other
channels too (a module applied to its own output, conv(conv(x)), or a BatchNorm shared
by two convs), and a tree that would not fit the model at the merged width (a variable
whose size the module fixes itself, e.g. self.param('s', init, (C,))).

If every cluster's filters and all their per-channel parameters are identical, the
merged network computes exactly the same logits; labels all distinct give back the same
tree. Computation is in float64, and the leaves keep their dtype.

A merge is first a plan (`plan_merge`: every leaf axis it will reduce, and how), which
can be printed, then applied (`MergePlan.apply`), as Torch-Pruning groups before it
prunes. The plan is `graycnn.merge.plan`, the reductions `graycnn.merge.reducers`, the
check that the merged tree fits the model `graycnn.merge.shapes`; their public names are
importable from here too.

Example:
    >>> g = graph.trace(model, variables, (1, 32, 32, 1))
    >>> plan = plan_merge(g, 1, labels)
    >>> print(plan.describe())
    conv 'stem' (group: stem): 36 -> 20 channels
      params/stem/kernel axis 3: produce (mean)
      ...
    >>> merged = plan.apply(variables)
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn

from graycnn import graph, nnx_adapter
from graycnn.layers import LayerRef
from graycnn.merge.bn_rules import BN_RULES, merge_batchnorm
from graycnn.merge.plan import MergePlan, PlanStep, check_labels, plan_merge, plan_prune
from graycnn.merge.reducers import Reducer

__all__ = [
    "BN_RULES",
    "MergePlan",
    "PlanStep",
    "Reducer",
    "check_labels",
    "merge_batchnorm",
    "merge_layer",
    "merge_layers",
    "plan_merge",
    "plan_prune",
]


def merge_layer(
    model: nn.Module,
    variables: Mapping[str, Any],
    layer: LayerRef,
    labels: Any,
    *,
    input_shape: Sequence[int],
    bn_rule: str = "moments",
) -> dict[str, Any]:
    """Returns new variables with the filters of conv `layer` merged per cluster.

    Args:
        model: The architecture, linen or NNX; conv widths are read off `variables`, so
            the original module works for an already merged tree.
        variables: {'params', 'batch_stats', ...}; not modified. For an nnx.Module, an
            nnx.State or None (the module's own state).
        layer: 1-based conv number (forward order) or conv path (for NNX the attribute
            path, e.g. 'blocks/0/conv').
        labels: (F,) ints 0..K-1, every cluster used, for the conv's F filters.
        input_shape: (N, H, W, C) of the images the tree expects.
        bn_rule: 'moments' (default), 'mean' (the study) or 'affine'; see
            `merge_batchnorm`.

    Returns:
        The merged tree; run it with `graph.rebuild(model, merged, input_shape)`. For an
        nnx.Module: a new nnx.State if one was given, else a new nnx.Module with the
        narrower convs, ready to run (the given module is not modified).

    Raises:
        ValueError: naming the path: unknown layer, bad labels, a conv whose channels no
            layer reads (the classifier) or that are read by an op that cannot be
            followed, NaN weights, a tree that does not match the model.
    """
    model, variables, back = nnx_adapter.adapt(model, variables)
    g = graph.trace(model, variables, input_shape)
    return back(plan_merge(g, layer, labels, bn_rule).apply(variables))


def merge_layers(
    model: nn.Module,
    variables: Mapping[str, Any],
    labels: Mapping[LayerRef, Any],
    *,
    input_shape: Sequence[int],
    bn_rule: str = "moments",
) -> dict[str, Any]:
    """Merges several layers in turn ({layer: labels}); layer numbers do not shift.
    Arguments and result as for `merge_layer`."""
    model, variables, back = nnx_adapter.adapt(model, variables)
    for layer, layer_labels in labels.items():
        variables = merge_layer(
            model, variables, layer, layer_labels, input_shape=input_shape, bn_rule=bn_rule
        )
    return back(variables)
