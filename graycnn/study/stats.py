"""Paired comparisons of two models on the same images: bootstrap CI and McNemar.

A model's predictions are a (S, N) bool array: whether it got image n right, for each of
S seeds of the run's stochastic stages (S = 1 for one run). Two models are compared on
the same images and seeds, so every statistic here is paired: it looks at the per-image
difference, which is far less noisy than the two accuracies apart.

Example:
    >>> a = np.array([[1, 1, 0, 1]], bool); b = np.array([[1, 0, 0, 1]], bool)
    >>> compare(a, b)["delta"]
    25.0
"""

from typing import Any

import numpy as np
import scipy.stats


def paired_bootstrap_ci(
    correct: np.ndarray,
    baseline: np.ndarray,
    *,
    resamples: int = 4000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the accuracy difference, in points.

    Each resample draws S seeds and N images with replacement (the same draw for both
    models, as the data are paired) and takes the mean of correct - baseline over them,
    so the interval covers the noise of both the images and the seeds.

    Args:
        correct, baseline: (S, N) or (N,) bool, the same images and seeds.
        resamples: Bootstrap draws.
        level: Coverage, e.g. 0.95.
        seed: Of the draws; same seed, same interval.

    Returns:
        (lo, hi) in accuracy points (100 x fraction).
    """
    d = _paired(correct, baseline)
    s, n = d.shape
    rng = np.random.default_rng(seed)
    # A resample: for each seed, the mean of d over N images drawn with replacement;
    # then S of those seed means drawn with replacement, averaged.
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // (s * n))  # bounds the (chunk, S, N) index array
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        images = rng.integers(0, n, size=(m, s, n))
        per_seed = d[np.arange(s)[None, :, None], images].mean(axis=2)  # (m, S)
        seeds = rng.integers(0, s, size=(m, s))
        means[start : start + m] = np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return 100.0 * float(lo), 100.0 * float(hi)


def mcnemar_exact(correct: np.ndarray, baseline: np.ndarray) -> float:
    """Exact (binomial) McNemar p-value, two-sided, on the discordant pairs.

    With several seeds the (seed, image) pairs are pooled, as if independent: the seeds
    share their images, so this p-value is then optimistic, and the verdicts use the
    bootstrap interval, which is not.

    Returns:
        p in [0, 1]; 1.0 when no pair is discordant.
    """
    d = _paired(correct, baseline)
    better, worse = int((d > 0).sum()), int((d < 0).sum())
    if better + worse == 0:
        return 1.0
    return float(scipy.stats.binomtest(better, better + worse, 0.5).pvalue)


def compare(correct: np.ndarray, baseline: np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """{'delta': points, 'ci95': [lo, hi] points, 'p_value', 'verdict'} of `correct`
    against `baseline`; the verdict is 'above' only when lo > 0, 'below' only when
    hi < 0, else 'tied'."""
    d = _paired(correct, baseline)
    lo, hi = paired_bootstrap_ci(correct, baseline, seed=seed)
    return {
        "delta": 100.0 * float(d.mean()),
        "ci95": [lo, hi],
        "p_value": mcnemar_exact(correct, baseline),
        "verdict": verdict(lo, hi),
    }


def verdict(lo: float, hi: float) -> str:
    """'above' when the whole interval is above 0, 'below' when below, else 'tied'."""
    if lo > 0:
        return "above"
    if hi < 0:
        return "below"
    return "tied"


def _paired(correct: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    a = np.atleast_2d(np.asarray(correct, bool))
    b = np.atleast_2d(np.asarray(baseline, bool))
    if a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"paired predictions must have the same non-empty shape (seeds, images); got "
            f"{a.shape} and {b.shape}"
        )
    return a.astype(np.int8) - b.astype(np.int8)
