"""graycnn.study.stats against closed forms, and the controls' groupings."""

import math

import numpy as np
import pytest

from graycnn.study import controls, stats


def _pairs(n: int, better: int, worse: int, both: int) -> tuple[np.ndarray, np.ndarray]:
    """n images: `better` only the model gets right, `worse` only the baseline, `both`
    both, the rest neither."""
    a, b = np.zeros(n, bool), np.zeros(n, bool)
    a[:better] = True
    b[better : better + worse] = True
    a[better + worse : better + worse + both] = True
    b[better + worse : better + worse + both] = True
    return a, b


def test_bootstrap_ci_matches_the_normal_interval_of_a_known_mean():
    # d = +1 on 300 images, -1 on 100, 0 on 1,600: mean 0.1, population variance
    # 0.2 - 0.01 = 0.19; the bootstrap mean over 2,000 images has sd sqrt(0.19 / 2000).
    a, b = _pairs(2000, 300, 100, 900)
    lo, hi = stats.paired_bootstrap_ci(a, b, resamples=8000, seed=1)
    half = 1.959964 * math.sqrt(0.19 / 2000)
    assert lo == pytest.approx(100 * (0.1 - half), abs=0.2)
    assert hi == pytest.approx(100 * (0.1 + half), abs=0.2)
    assert stats.paired_bootstrap_ci(a, b, seed=3) == stats.paired_bootstrap_ci(a, b, seed=3)


def test_bootstrap_over_seeds_covers_the_seed_noise():
    # Seed 0: the model is right on every image the baseline misses (d = 1 everywhere);
    # seed 1: they agree (d = 0). Image draws cannot move a seed's mean, so a resample's
    # mean is that of two seed draws from {1, 0}: 0, 0.5 or 1, with chances 1/4, 1/2, 1/4.
    a = np.array([[True] * 50, [True] * 50])
    b = np.array([[False] * 50, [True] * 50])
    lo, hi = stats.paired_bootstrap_ci(a, b, resamples=4000)
    assert (lo, hi) == (0.0, 100.0)
    result = stats.compare(a, b)
    assert result["delta"] == 50.0 and result["verdict"] == "tied"


def test_identical_predictions_tie_exactly():
    a, _ = _pairs(100, 30, 0, 0)
    result = stats.compare(a, a)
    assert result == {"delta": 0.0, "ci95": [0.0, 0.0], "p_value": 1.0, "verdict": "tied"}


@pytest.mark.parametrize("better, worse", [(12, 3), (3, 12), (7, 7), (40, 25), (1, 0)])
def test_mcnemar_exact_is_the_two_sided_binomial_tail(better, worse):
    a, b = _pairs(200, better, worse, 50)
    n, k = better + worse, min(better, worse)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    assert stats.mcnemar_exact(a, b) == pytest.approx(min(1.0, 2 * tail), rel=1e-9)


def test_verdicts_need_the_whole_interval_on_one_side():
    assert stats.verdict(0.1, 2.0) == "above"
    assert stats.verdict(-2.0, -0.1) == "below"
    assert stats.verdict(-0.1, 2.0) == stats.verdict(0.0, 0.0) == "tied"


def test_mismatched_predictions_are_an_error():
    with pytest.raises(ValueError, match="same non-empty shape"):
        stats.compare(np.ones(3, bool), np.ones(4, bool))


def test_random_labels_keep_cluster_sizes_and_vary_with_the_seed():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    draws = [controls.random_labels(labels, seed) for seed in range(5)]
    for r in draws:
        assert sorted(np.bincount(r)) == sorted(np.bincount(labels))
        # Renumbered in order of first appearance, as merge_layer expects.
        firsts = [int(np.flatnonzero(r == k)[0]) for k in range(r.max() + 1)]
        assert firsts == sorted(firsts)
    assert len({r.tobytes() for r in draws}) > 1
    np.testing.assert_array_equal(controls.random_labels(labels, 3), draws[3])
