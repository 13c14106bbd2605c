"""How a cluster's BatchNorm vectors merge into one channel's (the rules of `merge`)."""

from typing import Any

import numpy as np

BN_RULES = ("moments", "mean", "affine")


def merge_batchnorm(
    mean: np.ndarray,
    var: np.ndarray,
    scale: np.ndarray | None,
    bias: np.ndarray | None,
    labels: np.ndarray,
    epsilon: float,
    rule: str = "moments",
) -> dict[str, np.ndarray | None]:
    """Merges BatchNorm vectors (F,) into (K,) per cluster.

    The merged conv's output for a cluster is z = mean_i x_i, the mean of its members'
    outputs. Its running mean is then exactly mean(mean_i). Clustering groups filters of
    the same pattern, whose outputs are (nearly) perfectly correlated but may differ in
    scale: x_i = mean_i + std_i n for one normalized signal n. Then z = mean(mean_i) +
    mean(std_i) n, so with

        'moments' (default): mean = mean(mean_i), sqrt(var + eps) = mean(sqrt(var_i +
        eps)), scale = mean(scale_i), bias = mean(bias_i),

    the merged BN normalizes z to the same n as every member, and scale n + bias is the
    least-squares fit of the members' outputs scale_i n + bias_i. Averaging the variances
    instead (rms of the stds, >= their mean by Jensen) over-estimates the merged std;
    the true std of z is at most mean(std_i), equal for perfectly correlated members.

        'mean': average all four tensors (the study).
        'affine': average the members' affine maps y_i = s_i x + t_i (s_i = scale_i /
        std_i, t_i = bias_i - s_i mean_i), the least-squares fit when the members'
        outputs are equal (x_i = z) rather than equal up to scale; mean and std as in
        'moments', scale and bias chosen to express the averaged map. A member of small
        std has a large s_i and dominates, so it suits near-duplicate filters only.

    All three are exact when a cluster's members are identical, and a cluster of one
    keeps its tensors bit for bit.

    Args:
        mean, var: (F,) running statistics.
        scale, bias: (F,) or None when the BN has no scale or bias.
        labels: (F,) 0..K-1.
        epsilon: The BN's epsilon.
        rule: 'moments', 'mean' or 'affine'.

    Returns:
        {'mean', 'var', 'scale', 'bias'}: (K,) float64, None where the input was None.
    """
    if rule not in BN_RULES:
        raise ValueError(f"unknown BatchNorm merge rule {rule!r}; rules: {BN_RULES}")
    labels = np.asarray(labels)
    avg = cluster_matrix(labels, normalize=True)
    tensors: dict[str, Any] = dict(mean=mean, var=var, scale=scale, bias=bias)
    tensors = {k: None if v is None else np.asarray(v, np.float64) for k, v in tensors.items()}
    if rule == "mean":
        merged = {k: None if v is None else avg @ v for k, v in tensors.items()}
    else:
        merged = _moments_average(tensors, avg, epsilon, affine=rule == "affine")
    return _keep_singles(merged, tensors, labels)


def _keep_singles(merged: dict, tensors: dict, labels: np.ndarray) -> dict[str, Any]:
    """`merged` with each cluster of one given its member's tensors back, bit for bit
    (the float64 round trips of the rules are not exact for them); modified in place."""
    single = np.flatnonzero(np.bincount(labels) == 1)
    member = np.array([np.flatnonzero(labels == k)[0] for k in single], np.int64)
    for key, value in merged.items():
        if value is not None and len(single):
            value[single] = tensors[key][member]
    return merged


def _moments_average(tensors, avg, epsilon, affine: bool) -> dict[str, Any]:
    """BN tensors of rule 'moments' (the mean std), or 'affine' when `affine`."""
    std = np.sqrt(tensors["var"] + epsilon)
    std_new = avg @ std
    merged = {
        "mean": avg @ tensors["mean"],
        # A mean of numbers >= sqrt(eps) is >= sqrt(eps): var stays >= 0.
        "var": np.maximum(std_new**2 - epsilon, 0.0),
        "scale": None if tensors["scale"] is None else avg @ tensors["scale"],
        "bias": None if tensors["bias"] is None else avg @ tensors["bias"],
    }
    if affine:
        return _affine_average(tensors, std, std_new, merged["mean"], avg, epsilon)
    return merged


def _affine_average(tensors, std, std_new, mean_new, avg, epsilon) -> dict[str, Any]:
    """BN tensors expressing the average of the members' affine maps (rule 'affine')."""
    scale, bias = tensors["scale"], tensors["bias"]
    s = (1.0 if scale is None else scale) / std
    t = (0.0 if bias is None else bias) - s * tensors["mean"]
    s_new, t_new = avg @ s, avg @ t
    if scale is None:
        std_new = 1.0 / s_new  # With scale fixed at 1, only the std can carry s.
    if bias is None:
        mean_new = -t_new / s_new  # With bias fixed at 0, only the mean can carry t.
    return {
        "mean": mean_new,
        # 1 / mean(1 / std_i) >= min(std_i) >= sqrt(eps) too.
        "var": np.maximum(std_new**2 - epsilon, 0.0),
        "scale": None if scale is None else s_new * std_new,
        "bias": None if bias is None else t_new + s_new * mean_new,
    }


def cluster_matrix(labels: np.ndarray, normalize: bool) -> np.ndarray:
    """(K, F): row k sums (or averages) the members of cluster k."""
    one_hot = (labels[None, :] == np.arange(labels.max() + 1)[:, None]).astype(np.float64)
    return one_hot / one_hot.sum(axis=1, keepdims=True) if normalize else one_hot
