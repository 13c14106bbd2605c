"""Control groupings: what a merge must beat at the same widths.

`random_labels` keeps a clustering's cluster sizes and deals the filters out at random;
`l1_keep` picks the filters a magnitude pruner keeps (Li et al. 2017, "Pruning Filters
for Efficient ConvNets": largest L1 norm). Both give exactly the widths of the merge
they control for, so any accuracy difference is the grouping's, not the size's.

Example:
    >>> random_labels(np.array([0, 0, 1, 2]), seed=0)   # sizes 2, 1, 1 kept
    array([1, 0, 0, 2])
"""

import typing
from collections.abc import Mapping
from typing import Any

import numpy as np

from graycnn import graph
from graycnn.tree import flatten


def random_labels(labels: Any, seed: int) -> np.ndarray:
    """A uniformly random partition with the same cluster sizes as `labels`.

    Args:
        labels: (F,) ints 0..K-1.
        seed: Same seed, same partition.

    Returns:
        (F,) int64, 0..K-1, renumbered in order of first appearance.
    """
    labels = np.asarray(labels, np.int64)
    shuffled = np.random.default_rng(seed).permutation(labels)
    _, first, inverse = np.unique(shuffled, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # cluster -> rank of its first appearance
    return order[inverse].astype(np.int64)


def l1_keep(g: graph.ChannelGraph, variables: Mapping[str, Any], path: str, k: int) -> np.ndarray:
    """The `k` filters of conv `path` with the largest kernel L1 norm, ascending.

    Raises:
        ValueError: k outside 1..F, naming the conv.
    """
    op = g.layers[path]
    kernel = np.asarray(flatten(variables)[typing.cast(str, op.kernel)])
    axis = op.out_axis if op.out_axis is not None else kernel.ndim - 1
    norms = np.abs(np.moveaxis(kernel, axis, -1)).reshape(-1, kernel.shape[axis]).sum(axis=0)
    if not 1 <= k <= len(norms):
        raise ValueError(f"cannot keep {k} of the {len(norms)} filters of conv {path!r}")
    # Stable on ties: the lower index wins, so the choice is deterministic.
    return np.sort(np.argsort(-norms, kind="stable")[:k])
