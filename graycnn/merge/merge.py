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
prunes.

Example:
    >>> g = graph.trace(model, variables, (1, 32, 32, 1))
    >>> plan = plan_merge(g, 1, labels)
    >>> print(plan.describe())
    conv 'stem' (group: stem): 36 -> 20 channels
      params/stem/kernel axis 3: produce (mean)
      ...
    >>> merged = plan.apply(variables)
"""

import dataclasses
import re
import typing
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from graycnn import graph, nnx_adapter
from graycnn.graph import ChannelGraph, Segment, like_leaf, module_of
from graycnn.layers import LayerRef, resolve_layer
from graycnn.merge.bn_rules import BN_RULES, cluster_matrix, merge_batchnorm
from graycnn.tree import flatten, unflatten

_BN_ROLES = {"mean": "batch_stats", "var": "batch_stats", "scale": "params", "bias": "params"}


def check_labels(labels: Any, width: int, path: str) -> np.ndarray:
    """Returns labels as (width,) int64 after checking they are 0..K-1 with no gap.

    Integers of any dtype are accepted, and floats whose values are whole numbers (what
    some clustering libraries return); bools, strings and other objects are refused.

    Raises:
        ValueError: naming `labels` and `path`, for a wrong length or dtype, non-integers,
            labels out of 0..width-1 or missing labels.
    """
    arr = np.asarray(labels)
    if arr.shape != (width,):
        raise ValueError(
            f"labels for conv {path!r} must have shape ({width},), one per filter; "
            f"got shape {arr.shape}"
        )
    # A bool array would pass as 2 clusters; strings and objects have no cluster order.
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(
            f"labels for conv {path!r} must be integer cluster numbers, got dtype {arr.dtype}"
        )
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.mod(arr, 1) == 0):
        raise ValueError(f"labels for conv {path!r} must be integers, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"labels for conv {path!r}: the conv has no filters")
    if arr.min() < 0 or arr.max() >= width:
        # K clusters of `width` filters: every label is in 0..width-1 (and checking this
        # first keeps the gap check below from looping up to a huge label).
        raise ValueError(
            f"labels for conv {path!r} must be 0..K-1 with K <= {width} filters, got "
            f"values {arr.min()}..{arr.max()}"
        )
    arr = arr.astype(np.int64)
    missing = sorted(set(range(arr.max() + 1)) - set(arr.tolist()))
    if missing:
        raise ValueError(
            f"labels for conv {path!r} must use every cluster 0..{arr.max()}; "
            f"missing {missing[:20]}"
        )
    return arr


@dataclasses.dataclass(frozen=True)
class PlanStep:
    """One reduction of a merge: `leaves` (one leaf, or a BatchNorm's leaves by role)
    along `axis`, whose positions hold `segments`, reduced per cluster by `how`
    ('mean' for a conv's filters or a per-channel vector, 'sum' for a consumer's input
    slices, 'batchnorm' by the plan's BN rule)."""

    leaves: tuple[tuple[str, str], ...]  # ((role, leaf path), ...)
    axis: int
    segments: tuple[Segment, ...]
    kind: str
    how: str
    epsilon: float | None = None


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """What merging a conv's filters by `labels` changes, before anything is changed.

    Attributes:
        path: The conv's module path.
        group: Every conv merged with the same labels (its residual group).
        labels: (F,) int64, 0..K-1: merged channel k is cluster k. For a grouped conv
            the clusters are renumbered group by group (order kept within a group).
        bn_rule: How BatchNorm vectors are merged (see `merge_batchnorm`).
        steps: Every leaf axis reduced, in a fixed order.
        consumers: The convs and dense layers whose input slices are summed.
        prune: A pruning plan (`plan_prune`): labels are -1 for dropped filters and
            0..K-1 for kept ones, and every step keeps the kept filters' slices and
            drops the rest, in conv, per-channel vectors and consumers alike.
    """

    path: str
    group: tuple[str, ...]
    labels: np.ndarray
    bn_rule: str
    steps: tuple[PlanStep, ...]
    consumers: tuple[str, ...]
    prune: bool = False

    @property
    def num_clusters(self) -> int:
        return int(self.labels.max()) + 1

    def describe(self) -> str:
        """A readable listing of the plan, one line per reduced leaf axis."""
        lines = [
            f"{'prune' if self.prune else 'merge'} conv {self.path!r} (group: "
            f"{', '.join(self.group)}): {len(self.labels)} -> {self.num_clusters} channels; "
            f"consumers: {', '.join(self.consumers)}"
        ]
        for step in self.steps:
            leaves = ", ".join(leaf for _, leaf in step.leaves)
            how = "keep" if self.prune else step.how
            lines.append(f"  {leaves} axis {step.axis}: {step.kind} ({how})")
        return "\n".join(lines)

    def apply(
        self, variables: Mapping[str, Any], *, keep_widths: bool = False
    ) -> dict[str, Any] | nnx.State:
        """Returns the merged tree (a new nnx.State for an nnx.State); `variables` is not
        modified.

        Args:
            keep_widths: Return the merged network's function in the original shapes
                instead: every filter of a cluster becomes the merged filter, so its
                channels all carry the merged channel, and each consumer reads them with
                the merged weight split evenly among them. The same architecture then
                runs every merge of a layer with one compiled program (the budget
                search's sensitivities); BatchNorm statistics re-estimated on it equal
                the narrow model's, channel for channel.
        """
        if keep_widths and self.prune:
            raise ValueError("keep_widths is for merges, not for a pruning plan")
        if isinstance(variables, nnx.State):
            merged = self.apply(nnx_adapter.to_variables(variables), keep_widths=keep_widths)
            return nnx_adapter.to_state(merged, variables)
        flat = flatten(variables)
        new = dict(flat)
        members = set(self.group)
        reducer: Reducer
        for step in self.steps:
            if self.prune:
                reducer = _keep
            elif step.how == "batchnorm":
                reducer = _bn_reducer(typing.cast(float, step.epsilon), self.bn_rule)
            else:
                reducer = _sum if step.how == "sum" else _mean
            if keep_widths:
                # n identical channels share a consumer's summed slice: each reads the
                # n-th part of the sum, the members' mean.
                reducer = _widened(_mean if step.how == "sum" else reducer)
            arrays = {role: new[leaf] for role, leaf in step.leaves}
            merged = _merge_axis(
                arrays, step.axis, step.segments, members, self.labels, reducer, self.path,
                step.leaves[0][1],
            )  # fmt: skip
            for role, leaf in step.leaves:
                new[leaf] = merged[role]
        return unflatten(new)


def plan_merge(
    g: ChannelGraph, layer: LayerRef, labels: Any, bn_rule: str = "moments"
) -> MergePlan:
    """The plan of merging conv `layer`'s filters by `labels` in the traced model `g`.

    Raises:
        ValueError: naming the conv: unknown layer, bad labels, channels no layer reads
            (the classifier) or read by an op that cannot be followed, clusters that cross
            a grouped conv's groups or keep unequal groups, a kernel or BatchNorm shared
            between layers, or a leaf (named) the model makes in another shape at the
            merged width.
    """
    if bn_rule not in BN_RULES:
        raise ValueError(f"unknown BatchNorm merge rule {bn_rule!r}; rules: {BN_RULES}")
    path = resolve_layer(layer, g.conv_order)
    g.check_mergeable(path)
    labels = _within_groups(g, path, check_labels(labels, g.widths[path], path))
    plan = MergePlan(
        path, g.group(path), labels, bn_rule, _steps(g, path), tuple(g.consumers(path))
    )
    _check_shapes(g, plan)
    return plan


def _steps(g: ChannelGraph, path: str) -> tuple[PlanStep, ...]:
    """Every leaf axis that merging `path`'s group reduces, in a fixed order."""
    members = set(g.group(path))
    layouts: dict[str, dict[int, set]] = defaultdict(lambda: defaultdict(set))
    for use in g.uses_of(path):
        layouts[use.leaf][use.axis].add((use.segments, use.kind))
        for seg in use.segments:
            if seg.source in members and (seg.start, seg.length) != (0, g.widths[seg.source]):
                raise ValueError(
                    f"cannot merge conv {path!r}: {use.leaf} reads channels "
                    f"{seg.start}..{seg.start + seg.length - 1} of {seg.source}, not all "
                    f"{g.widths[seg.source]}"
                )
    # A leaf axis that is read with other channels elsewhere too (a BatchNorm or a
    # kernel shared between layers) cannot follow this merge alone.
    for use in g.uses:
        if use.leaf in layouts and use.axis in layouts[use.leaf]:
            layouts[use.leaf][use.axis].add((use.segments, use.kind))
    for leaf, axes in layouts.items():
        for axis, found in axes.items():
            if len(found) > 1:
                raise ValueError(
                    f"cannot merge conv {path!r}: {leaf} axis {axis} is read with "
                    f"{len(found)} different channel layouts (module {module_of(leaf)!r} is "
                    "shared between layers)"
                )
    steps: list[PlanStep] = []
    done: set[str] = set()
    for leaf, axes in layouts.items():
        if leaf in done:
            continue
        module, role = module_of(leaf), leaf.rsplit("/", 1)[-1]
        for axis, ((segments, kind),) in sorted(axes.items()):
            if kind == "elementwise" and module in g.batchnorms and role in _BN_ROLES:
                bn = tuple(
                    (r, f"{c}/{module}/{r}")
                    for r, c in _BN_ROLES.items()
                    if f"{c}/{module}/{r}" in g.leaf_shapes
                )
                for _, other in bn:
                    if layouts.get(other, {}).get(axis) != {(segments, kind)}:
                        raise ValueError(
                            f"cannot merge conv {path!r}: BatchNorm {module} leaf {other} "
                            "does not read the same channels as its other leaves"
                        )
                steps.append(PlanStep(bn, axis, segments, kind, "batchnorm", g.batchnorms[module]))
                done.update(other for _, other in bn)
            else:
                how = "sum" if kind == "contract" else "mean"
                steps.append(PlanStep((("x", leaf),), axis, segments, kind, how))
    return tuple(steps)


def _within_groups(
    g: ChannelGraph, path: str, labels: np.ndarray, prune: bool = False
) -> np.ndarray:
    """`labels` renumbered so that each group's clusters are contiguous, for a group
    with a grouped conv (feature_group_count > 1): output channel k of a conv of G
    groups belongs to group k // (width / G), so merged channel k must come from that
    group. Labels -1 (pruned filters) stay -1.

    Raises:
        ValueError: naming the conv, its groups and the counts, when a cluster mixes
            filters of two groups or the groups keep different numbers of channels.
    """
    grouped = [(m, g.layers[m].groups) for m in g.group(path) if g.layers[m].groups > 1]
    if not grouped:
        return labels
    verb = "prune" if prune else "merge"
    width, count = len(labels), int(labels.max()) + 1
    first = np.array([np.flatnonzero(labels == k)[0] for k in range(count)], np.int64)
    for member, groups in grouped:
        size = width // groups
        group_of = np.arange(width) // size
        for k in range(count):
            found = np.unique(group_of[labels == k])
            if len(found) > 1:
                raise ValueError(
                    f"cannot {verb} conv {path!r}: {member} is a grouped conv ({groups} groups "
                    f"of {size} filters) and cluster {k} mixes groups {found.tolist()} "
                    f"(filters {np.flatnonzero(labels == k).tolist()}); every cluster must "
                    "stay within one group"
                )
        counts = np.bincount(group_of[first], minlength=groups)
        if len(set(counts.tolist())) > 1:
            raise ValueError(
                f"cannot {verb} conv {path!r}: {member} is a grouped conv ({groups} groups of "
                f"{size} filters), which needs as many channels in every group; the "
                f"{'kept filters are' if prune else 'labels keep'} {counts.tolist()} per group"
            )
    # Interval partitions: ordering by the group under every grouping orders by all.
    key = [
        tuple(first[k] // (width // groups) for _, groups in grouped) + (k,) for k in range(count)
    ]
    new = np.empty(count, np.int64)
    new[sorted(range(count), key=key.__getitem__)] = np.arange(count)
    return np.where(labels >= 0, new[np.maximum(labels, 0)], labels)


def _check_shapes(g: ChannelGraph, plan: "MergePlan") -> None:
    """Raises ValueError naming the leaf unless the planned tree fits the model at the
    merged width (a variable whose size the module fixes itself, e.g. a custom
    self.param of (C,) multiplied onto the conv's output, does not follow it)."""
    count, members = plan.num_clusters, set(plan.group)
    widths = {m: count for m in plan.group}
    planned = {leaf: list(shape) for leaf, shape in g.leaf_shapes.items()}
    for step in plan.steps:
        whole = [s for s in step.segments if s.source in members]
        for _, leaf in step.leaves:
            planned[leaf][step.axis] += len(whole) * count - sum(s.length for s in whole)
    where = f"cannot {'prune' if plan.prune else 'merge'} conv {plan.path!r} to {count} filters"
    why = (
        "(the merge does not follow this variable: its module fixes its size rather than "
        "reading it off its input, or uses it inside a module registered as one op)"
    )
    try:
        expected = g.leaf_shapes_at(widths)
    except ValueError as e:
        # Initialising at the merged width fails, e.g. on the fixed-size variable itself;
        # whether the merged tree runs decides (an nnx.Module runs the arrays it holds).
        if (reason := _runs(g, widths, planned)) is None:
            return
        raise ValueError(f"{where}: {reason} {why}") from e
    for leaf, shape in planned.items():
        if expected.get(leaf) != tuple(shape):
            made = "no such leaf" if leaf not in expected else str(expected[leaf])
            raise ValueError(
                f"{where}: {leaf} would be {tuple(shape)}, but the model makes {made} {why}"
            )
    extra = sorted(set(expected) - set(planned))
    if extra:
        raise ValueError(f"{where}: the model then makes leaves the tree lacks: {extra[:8]}")


def _runs(g: ChannelGraph, widths: dict[str, int], planned: dict[str, list[int]]) -> str | None:
    """None if the model at `widths` runs a tree of the `planned` shapes, else why not,
    naming the leaf where Flax does."""
    dtypes = {p: np.dtype(np.float32) for p in planned}
    shapes = unflatten({p: jax.ShapeDtypeStruct(tuple(s), dtypes[p]) for p, s in planned.items()})
    model = graph.with_widths(g.model, widths)
    x = jax.ShapeDtypeStruct(g.input_shape, np.float32)
    try:
        jax.eval_shape(lambda v, x: model.apply(v, x, **graph.call_kwargs(model)), shapes, x)
    except Exception as e:  # Flax raises many types for trees that do not fit.
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        found = re.search(r'For parameter "([^"]+)" in "([^"]*)".*generate shape (\(.*?\))', text)
        if found is None:
            return f"the merged model does not run: {text}"
        name, scope, made = found.groups()
        leaf = "/".join(["params", *(p for p in scope.split("/") if p), name])
        got = tuple(planned[leaf]) if leaf in planned else "changed"
        return f"{leaf} would be {got}, but the model makes {made}"
    return None


def plan_prune(g: ChannelGraph, layer: LayerRef, keep: Any) -> MergePlan:
    """The plan of pruning conv `layer` to the filters `keep` (indices, in the order the
    pruned conv will hold them): a merge without folding, whose consumers simply lose
    the dropped filters' input slices.

    Raises:
        ValueError: naming the conv, for an unmergeable conv or bad indices.
    """
    path = resolve_layer(layer, g.conv_order)
    width = g.widths.get(path)
    keep = np.asarray(keep)
    if (
        width is None
        or keep.ndim != 1
        or keep.size == 0
        or not np.issubdtype(keep.dtype, np.integer)
        or len(set(keep.tolist())) != keep.size
        or keep.min() < 0
        or keep.max() >= width
    ):
        raise ValueError(
            f"keep for conv {path!r} must be distinct filter indices in [0, {width}), "
            f"got {keep.tolist()[:20]}"
        )
    g.check_mergeable(path)
    pruned = np.full(width, -1, np.int64)
    pruned[keep] = np.arange(keep.size)
    pruned = _within_groups(g, path, pruned, prune=True)
    plan = MergePlan(
        path, g.group(path), pruned, "moments", _steps(g, path), tuple(g.consumers(path)), True
    )
    _check_shapes(g, plan)
    return plan


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


Reducer = Callable[[dict[str, np.ndarray], np.ndarray], dict[str, np.ndarray]]


def _sum(arrays: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": np.tensordot(cluster_matrix(labels, False), arrays["x"], axes=1)}


def _mean(arrays: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": np.tensordot(cluster_matrix(labels, True), arrays["x"], axes=1)}


def _keep(arrays: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
    kept = np.argsort(np.where(labels < 0, labels.max() + 1, labels), kind="stable")
    kept = kept[: labels.max() + 1]  # kept[k] is the filter labelled k
    return {r: a[kept] for r, a in arrays.items()}


def _widened(reducer: Reducer) -> Reducer:
    """`reducer`'s K merged slices given back to the F members of their clusters."""

    def reduce(arrays, labels):
        return {r: a[labels] for r, a in reducer(arrays, labels).items()}

    return reduce


def _bn_reducer(epsilon: float, rule: str) -> Reducer:
    def reduce(arrays, labels):
        out = merge_batchnorm(
            arrays["mean"],
            arrays["var"],
            arrays.get("scale"),
            arrays.get("bias"),
            labels,
            epsilon,
            rule,
        )
        return {k: v for k, v in out.items() if k in arrays}

    return reduce


def _merge_axis(
    arrays: dict[str, Any],
    axis: int,
    segments: tuple[Segment, ...],
    members: set[str],
    labels: np.ndarray,
    reducer: Reducer,
    path: str,
    leaf: str,
) -> dict[str, Any]:
    """Applies `reducer` to each group member's slice along `axis` of every array."""
    host = {r: np.asarray(a, np.float64) for r, a in arrays.items()}
    pieces: dict[str, list[np.ndarray]] = {r: [] for r in arrays}
    pos = 0
    for seg in segments:
        part = {r: np.take(a, np.arange(pos, pos + seg.length), axis=axis) for r, a in host.items()}
        pos += seg.length
        if seg.source in members:
            if seg.start != 0 or seg.length != len(labels):
                raise ValueError(
                    f"cannot merge conv {path!r}: {leaf} reads channels "
                    f"{seg.start}..{seg.start + seg.length - 1} of {seg.source}, not all "
                    f"{len(labels)}"
                )
            moved = {r: np.moveaxis(a, axis, 0) for r, a in part.items()}
            part = {r: np.moveaxis(a, 0, axis) for r, a in reducer(moved, labels).items()}
        for r in pieces:
            pieces[r].append(part[r])
    return {r: like_leaf(arrays[r], np.concatenate(pieces[r], axis=axis)) for r in arrays}
