"""A merge (or a pruning) of a conv's filters as a plan: every leaf axis it reduces, and how.

`plan_merge` and `plan_prune` check the labels (or kept filters) against the traced
model (`graycnn.graph`), list the leaf axes the merge reduces (`PlanStep`s) and check
that the merged tree fits the model (`graycnn.merge.shapes`); the `MergePlan` they
return can be printed (`describe`) before it is applied (`apply`, by
`graycnn.merge.reducers`).
"""

import dataclasses
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from graycnn import nnx_adapter
from graycnn.graph import ChannelGraph, Segment, module_of
from graycnn.layers import LayerRef, resolve_layer
from graycnn.merge.bn_rules import BN_RULES
from graycnn.merge.reducers import merge_axis, reducer_for
from graycnn.merge.shapes import check_shapes
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
        for step in self.steps:
            reducer = reducer_for(step.how, step.epsilon, self.bn_rule, self.prune, keep_widths)
            arrays = {role: new[leaf] for role, leaf in step.leaves}
            merged = merge_axis(
                arrays, step.axis, step.segments, members, self.labels, reducer, self.path,
                step.leaves[0][1],
            )  # fmt: skip
            for role, leaf in step.leaves:
                new[leaf] = merged[role]
        return unflatten(new)


def plan_merge(
    g: ChannelGraph, layer: LayerRef, labels: Any, bn_rule: str = "moments", check: bool = True
) -> MergePlan:
    """The plan of merging conv `layer`'s filters by `labels` in the traced model `g`.

    `check=False` skips the last check below, the model's init traced at the merged width
    (`check_shapes`): for a caller that checked the same conv at another count and checks
    the count it keeps (the budget search).

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
    if check:
        check_shapes(g, plan)
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
    check_shapes(g, plan)
    return plan
