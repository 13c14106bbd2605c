"""Clustering of receptive fields from a precomputed distance matrix.

The study clustered filters with DBSCAN(min_samples=1) on a distance matrix
(eps = 0.027 on min-max-scaled MSE for layer 1; eps = 0.2 * std of the
distances elsewhere). DBSCAN with min_samples=1 is single linkage: it chains
dissimilar filters together through intermediate ones, so complete linkage is
offered as well. Labels are always renumbered 0..K-1 in order of first
appearance, which is what the merge code consumes.

Example:
  >>> d = np.array([[0.0, 0.1, 5.0], [0.1, 0.0, 5.0], [5.0, 5.0, 0.0]])
  >>> cluster(d, "dbscan", eps=1.0).members
  [[0, 1], [2]]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import sklearn.cluster

METHODS = ("dbscan", "complete")
_EPS_RULES = ("eps", "eps_scaled", "eps_std", "num_clusters")
_COMPLETE_RULES = ("threshold", "num_clusters")
# Relative tolerance on |D - D^T| and |diag D|: float32 distances round differently.
_SYMMETRY_RTOL = 1e-5


@dataclasses.dataclass(frozen=True, eq=False)
class Clustering:
    """The outcome of `cluster`.

    Attributes:
      labels: (N,) int, cluster of each item, 0..K-1 in order of first appearance.
      members: K lists of item indices, ascending; members[k] holds label k.
      num_clusters: K.
      method: "dbscan" or "complete".
      eps: the absolute DBSCAN radius used (None for complete linkage).
      threshold: the complete-linkage distance threshold used, if one was
        given (None otherwise).
    """

    labels: np.ndarray
    members: list[list[int]]
    num_clusters: int
    method: str
    eps: float | None = None
    threshold: float | None = None


def renumber(labels: Any) -> np.ndarray:
    """Relabels clusters 0..K-1 in order of first appearance.

    Args:
      labels: (N,) any hashable-valued labels (ints, strings); -1 is not special.

    Returns:
      (N,) int64, a new array.

    Example:
      >>> renumber([7, 7, 3, 9, 3])
      array([0, 0, 1, 2, 1])
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected shape (N,), got {labels.shape}")
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    # np.unique orders clusters by value; rank them by their first index instead.
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def members_of(labels: np.ndarray) -> list[list[int]]:
    """Member lists of each cluster.

    Args:
      labels: (N,) int in 0..K-1, e.g. from `renumber`.

    Returns:
      K ascending lists of item indices; list k holds the items labelled k.
    """
    return [np.flatnonzero(labels == k).tolist() for k in range(int(labels.max()) + 1)]


def _validated_distances(distances: Any) -> np.ndarray:
    """Checks a distance matrix and returns a symmetrized float64 copy with zero diagonal."""
    d = np.array(distances, dtype=np.float64)  # a copy: the input is never touched
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distances: expected a square (N, N) matrix, got shape {d.shape}")
    if d.shape[0] < 2:
        raise ValueError(f"distances: need N >= 2 items to cluster, got N={d.shape[0]}")
    if not np.all(np.isfinite(d)):
        raise ValueError(
            f"distances: {int(np.count_nonzero(~np.isfinite(d)))} non-finite entries (NaN or inf)"
        )
    if np.any(d < 0):
        raise ValueError(f"distances: negative entries (min {d.min():.6g})")
    tol = _SYMMETRY_RTOL * max(float(np.max(d)), np.finfo(np.float64).tiny)
    asym = float(np.max(np.abs(d - d.T)))
    if asym > tol:
        raise ValueError(f"distances: not symmetric (max |D - D^T| = {asym:.3g} > {tol:.3g})")
    diag = float(np.max(np.abs(np.diagonal(d))))
    if diag > tol:
        raise ValueError(f"distances: diagonal must be 0 (max |D_ii| = {diag:.3g} > {tol:.3g})")
    d = 0.5 * (d + d.T)
    np.fill_diagonal(d, 0.0)
    return d


def _check_num_clusters(num_clusters: Any, n: int) -> int:
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)):
        raise TypeError(f"num_clusters must be an int, got {num_clusters!r}")
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, N={n}], got {num_clusters}")
    return int(num_clusters)


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number > 0, got {value!r}")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _one_rule(method: str, rules: tuple[str, ...], options: dict[str, Any]) -> tuple[str, Any]:
    given = [rule for rule in rules if options.get(rule) is not None]
    if len(given) != 1:
        raise ValueError(
            f"method {method!r} needs exactly one of {list(rules)}, got {given or 'none'}"
        )
    return given[0], options[given[0]]


def _count_components(d: np.ndarray, eps: float) -> int:
    """Clusters of DBSCAN(min_samples=1, eps): connected components of D <= eps."""
    graph = scipy.sparse.csr_matrix(d <= eps)
    return scipy.sparse.csgraph.connected_components(graph, directed=False)[0]


def _eps_for_num_clusters(d: np.ndarray, num_clusters: int) -> float:
    """The DBSCAN(min_samples=1) radius that yields exactly `num_clusters` clusters.

    The count is non-increasing in eps and changes only at the distinct
    off-diagonal distances u_1 < ... < u_m: it is constant on (0, u_1) and on
    each [u_k, u_k+1). Bisection over these intervals is exact; the returned
    eps is the middle of the interval found, away from ties and round-off.

    Args:
      d: (N, N) validated distance matrix.
      num_clusters: target count in [1, N].

    Returns:
      eps > 0.

    Raises:
      ValueError: no eps gives that count (tied distances make the count jump
        over it); the message names the reachable counts on either side.
    """
    n = d.shape[0]
    values = np.unique(d[np.triu_indices(n, k=1)])
    lower = values.tolist()
    upper = [*values[1:].tolist(), np.inf]
    if values[0] > 0:
        # (0, u_1): every item alone.
        lower.insert(0, 0.0)
        upper.insert(0, values[0])

    def eps_in(k: int) -> float:
        if np.isinf(upper[k]):
            return 2.0 * lower[k] if lower[k] > 0 else 1.0
        return 0.5 * (lower[k] + upper[k])

    @functools.cache  # Each interval's count is computed once.
    def count(k: int) -> int:
        return _count_components(d, eps_in(k))

    # Smallest interval index whose count is <= the target.
    lo, hi = 0, len(lower) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) <= num_clusters:
            hi = mid
        else:
            lo = mid + 1
    if count(lo) == num_clusters:
        return eps_in(lo)
    if lo == 0:
        raise ValueError(
            f"num_clusters={num_clusters} is unreachable with DBSCAN: some items are at distance "
            f"0 from each other and merge at any eps > 0, so at most {count(0)} clusters are "
            f"reachable"
        )
    raise ValueError(
        f"num_clusters={num_clusters} is unreachable with DBSCAN: tied distances make the "
        f"count jump from {count(lo - 1)} (eps < {lower[lo]:.6g}) to {count(lo)} "
        f"(eps >= {lower[lo]:.6g}); reachable counts nearby: {count(lo - 1)}, {count(lo)}. "
        f"Complete linkage reaches any count."
    )


def _dbscan(d: np.ndarray, options: dict[str, Any]) -> Clustering:
    unknown = set(options) - set(_EPS_RULES) - {"min_samples"}
    if unknown:
        raise ValueError(
            f"dbscan: unknown options {sorted(unknown)}; known: {[*_EPS_RULES, 'min_samples']}"
        )
    min_samples = options.get("min_samples", 1)
    if isinstance(min_samples, bool) or not isinstance(min_samples, (int, np.integer)):
        raise TypeError(f"min_samples must be an int >= 1, got {min_samples!r}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    rule, value = _one_rule("dbscan", _EPS_RULES, options)
    off_diagonal = d[np.triu_indices(d.shape[0], k=1)]
    if rule == "eps":
        eps = _check_positive("eps", value)
    elif rule == "eps_scaled":
        # Global min-max scaling of the whole matrix (diagonal included, so the
        # minimum is 0): an eps on the scaled matrix is eps * max on the raw one.
        scaled = _check_positive("eps_scaled", value)
        span = float(d.max() - d.min())
        eps = float(d.min()) + scaled * span if span > 0 else scaled
    elif rule == "eps_std":
        k = _check_positive("eps_std", value)
        with np.errstate(over="ignore"):  # an overflow is refused below, by name
            eps = k * float(np.std(off_diagonal))
        if eps <= 0:
            raise ValueError(
                "eps_std: all off-diagonal distances are equal, so their std is 0 and eps = 0"
            )
    else:
        num_clusters = _check_num_clusters(value, d.shape[0])
        if min_samples != 1:
            raise ValueError(
                "num_clusters search needs min_samples=1 (the count is only monotone in eps "
                f"then), got min_samples={min_samples}"
            )
        eps = _eps_for_num_clusters(d, num_clusters)
    if not np.isfinite(eps):
        # A huge eps_scaled / eps_std, or distances near the float64 limit, overflow.
        raise ValueError(
            f"{rule}={value!r} gives eps = {eps} for distances up to {float(d.max()):.3g}; "
            f"give a smaller {rule}, or an absolute eps"
        )
    raw = sklearn.cluster.DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit(d)
    labels = raw.labels_.copy()
    # Noise (-1) only occurs with min_samples > 1; each noise filter stays unmerged.
    noise = np.flatnonzero(labels == -1)
    labels[noise] = labels.max(initial=-1) + 1 + np.arange(len(noise))
    return _clustering(labels, "dbscan", eps=eps)


def _complete(d: np.ndarray, options: dict[str, Any]) -> Clustering:
    unknown = set(options) - set(_COMPLETE_RULES)
    if unknown:
        raise ValueError(
            f"complete: unknown options {sorted(unknown)}; known: {list(_COMPLETE_RULES)}"
        )
    rule, value = _one_rule("complete", _COMPLETE_RULES, options)
    threshold = None
    if rule == "threshold":
        threshold = _check_positive("threshold", value)
        # sklearn merges while the complete-linkage distance is < threshold, so
        # every cluster's diameter ends up < threshold.
        model = sklearn.cluster.AgglomerativeClustering(
            n_clusters=None, distance_threshold=threshold, metric="precomputed", linkage="complete"
        )
    else:
        model = sklearn.cluster.AgglomerativeClustering(
            n_clusters=_check_num_clusters(value, d.shape[0]),
            metric="precomputed",
            linkage="complete",
        )
    return _clustering(model.fit(d).labels_, "complete", threshold=threshold)


def _clustering(labels: np.ndarray, method: str, **rule: Any) -> Clustering:
    labels = renumber(labels)
    return Clustering(labels, members_of(labels), int(labels.max()) + 1, method, **rule)


def cluster(distances: Any, method: str = "dbscan", **options: Any) -> Clustering:
    """Clusters N items from their (N, N) distance matrix.

    Args:
      distances: (N, N) float, symmetric, zero diagonal, finite, >= 0, N >= 2
        (e.g. from `graycnn.distance.pairwise`). Never modified.
      method: "dbscan" or "complete".
      **options: for "dbscan", exactly one eps rule:
          eps: the radius, absolute.
          eps_scaled: the radius on the min-max-scaled matrix (study: 0.027 on
            MSE); absolute eps = min + eps_scaled * (max - min) over the whole
            matrix, i.e. eps_scaled * max since the diagonal is 0.
          eps_std: eps = eps_std * std of the off-diagonal distances (study: 0.2).
          num_clusters: search the eps giving exactly this many clusters
            (min_samples=1 only); ValueError naming nearby reachable counts if
            ties make it impossible.
        plus min_samples (default 1, the study's: no noise). With min_samples >
        1, each noise point becomes its own cluster.
        For "complete" (agglomerative complete linkage), exactly one of:
          threshold: merge only while the cluster diameter stays < threshold.
          num_clusters: stop at this many clusters (always reachable).

    Returns:
      Clustering with labels (N,) in 0..K-1 by first appearance and members.

    Raises:
      ValueError: bad distances (NaN, non-square, asymmetric, N < 2), unknown
        method or option, a missing or duplicated rule, eps <= 0, or
        num_clusters outside [1, N].
    """
    d = _validated_distances(distances)
    if method == "dbscan":
        return _dbscan(d, options)
    if method == "complete":
        return _complete(d, options)
    raise ValueError(f"unknown method {method!r}; known methods: {list(METHODS)}")
