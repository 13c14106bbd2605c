"""Applying one step of a merge plan: the reduction of a leaf axis per cluster.

A reducer takes the arrays of one step (by role: "x", or a BatchNorm's "mean", "var",
"scale", "bias") with the merged conv's channels on axis 0, and the labels, and returns
them with one slice per cluster: the mean (a conv's filters, a per-channel vector), the
sum (a consumer's input slices), `merge_batchnorm`, or the kept filters of a pruning.
`merge_axis` applies one to each group member's slice of a leaf axis, in float64.
"""

import typing
from collections.abc import Callable
from typing import Any

import numpy as np

from graycnn.graph import Segment, like_leaf
from graycnn.merge.bn_rules import cluster_matrix, merge_batchnorm

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


def merge_axis(
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


def reducer_for(
    how: str, epsilon: float | None, bn_rule: str, prune: bool, keep_widths: bool
) -> Reducer:
    """The reducer of one plan step (`PlanStep.how`, `.epsilon`) in a plan with `bn_rule`:
    a pruning plan keeps the kept filters' slices; `keep_widths` gives each merged slice
    back to its cluster's members (see `MergePlan.apply`)."""
    reducer: Reducer
    if prune:
        reducer = _keep
    elif how == "batchnorm":
        reducer = _bn_reducer(typing.cast(float, epsilon), bn_rule)
    else:
        reducer = _sum if how == "sum" else _mean
    if keep_widths:
        # n identical channels share a consumer's summed slice: each reads the
        # n-th part of the sum, the members' mean.
        reducer = _widened(_mean if how == "sum" else reducer)
    return reducer
