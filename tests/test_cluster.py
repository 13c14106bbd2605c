"""Tests for graycnn.cluster and graycnn.study.figures.clusters."""

import numpy as np
import pytest

from graycnn import distance
from graycnn.cluster import cluster, renumber
from graycnn.study.figures.clusters import plot_clusters, plot_distance_matrix


def _euclidean(points):
    points = np.asarray(points, np.float64)
    return np.sqrt(np.sum((points[:, None] - points[None]) ** 2, axis=-1))


def _random_distances(n, seed=0):
    """A generic matrix: points in 5-D, so all pairwise distances are distinct."""
    return _euclidean(np.random.default_rng(seed).normal(size=(n, 5)))


# Three blobs, interleaved so that first-appearance numbering is visible.
_CENTERS = np.array([[10.0, 0.0], [0.0, 0.0], [0.0, 10.0]])
_BLOB_OF = np.array([1, 1, 0, 2, 0, 1, 2, 0, 2])
_BLOBS = _CENTERS[_BLOB_OF] + 0.1 * np.random.default_rng(0).normal(size=(9, 2))


def test_renumber_orders_by_first_appearance():
    np.testing.assert_array_equal(renumber([7, 7, 3, 9, 3, -1]), [0, 0, 1, 2, 1, 3])
    np.testing.assert_array_equal(renumber(np.array(["b", "a", "b"])), [0, 1, 0])


@pytest.mark.parametrize(
    "method, options", [("dbscan", {"eps": 1.0}), ("complete", {"threshold": 2.0})]
)
def test_known_blobs_give_known_labels(method, options):
    result = cluster(_euclidean(_BLOBS), method, **options)
    np.testing.assert_array_equal(result.labels, [0, 0, 1, 2, 1, 0, 2, 1, 2])
    assert result.members == [[0, 1, 5], [2, 4, 7], [3, 6, 8]]
    assert result.num_clusters == 3
    assert result.labels.dtype.kind == "i"


def test_noise_becomes_its_own_cluster_with_min_samples():
    points = np.concatenate([_BLOBS, [[50.0, 50.0], [-50.0, 50.0]]])
    result = cluster(_euclidean(points), "dbscan", eps=1.0, min_samples=2)
    assert result.num_clusters == 5
    assert result.members[-2:] == [[9], [10]]


def test_eps_scaled_and_eps_std_follow_hand_computation():
    d = _random_distances(15)
    scaled = cluster(d, "dbscan", eps_scaled=0.3)
    assert scaled.eps == pytest.approx(0.3 * d.max())
    np.testing.assert_array_equal(scaled.labels, cluster(d, "dbscan", eps=0.3 * d.max()).labels)
    off = d[np.triu_indices(15, k=1)]
    by_std = cluster(d, "dbscan", eps_std=0.9)
    assert by_std.eps == pytest.approx(0.9 * np.std(off))
    np.testing.assert_array_equal(by_std.labels, cluster(d, "dbscan", eps=0.9 * np.std(off)).labels)


def test_num_clusters_search_36_to_20_on_filters():
    images = np.random.default_rng(4).random((36, 8, 8)).astype(np.float32)
    d = np.asarray(distance.pairwise(images, "mse"))
    result = cluster(d, "dbscan", num_clusters=20)
    assert result.num_clusters == 20
    np.testing.assert_array_equal(result.labels, cluster(d, "dbscan", eps=result.eps).labels)


def test_num_clusters_search_reaches_every_count_with_distinct_distances():
    d = _random_distances(12, seed=5)
    for k in range(1, 13):
        assert cluster(d, "dbscan", num_clusters=k).num_clusters == k


def test_tied_distances_make_a_count_unreachable():
    # Items on a line at unit spacing: nothing merges for eps < 1, everything at 1.
    d = np.abs(np.subtract.outer(np.arange(4.0), np.arange(4.0)))
    with pytest.raises(ValueError, match=r"num_clusters=2 is unreachable.*4, 1"):
        cluster(d, "dbscan", num_clusters=2)


def test_duplicates_make_all_singletons_unreachable():
    d = _euclidean([[0.0], [0.0], [1.0], [3.0]])
    assert cluster(d, "dbscan", num_clusters=3).num_clusters == 3
    with pytest.raises(ValueError, match="at most 3 clusters"):
        cluster(d, "dbscan", num_clusters=4)


def test_complete_linkage_respects_threshold_and_count():
    d = _random_distances(20, seed=6)
    threshold = 2.5
    result = cluster(d, "complete", threshold=threshold)
    assert 1 < result.num_clusters < 20
    for members in result.members:
        assert d[np.ix_(members, members)].max() <= threshold
    assert cluster(d, "complete", num_clusters=7).num_clusters == 7


def test_complete_linkage_does_not_chain_like_dbscan():
    d = np.abs(np.subtract.outer(np.arange(10.0), np.arange(10.0)))
    assert cluster(d, "dbscan", eps=1.0).num_clusters == 1
    assert cluster(d, "complete", threshold=2.5).num_clusters > 1


def test_input_is_not_mutated():
    d = _random_distances(6)
    before = d.copy()
    cluster(d, "dbscan", eps=1.0)
    np.testing.assert_array_equal(d, before)


_GOOD = _random_distances(5)
_NAN = _GOOD.copy()
_NAN[1, 2] = _NAN[2, 1] = np.nan
_ASYMMETRIC = _GOOD.copy()
_ASYMMETRIC[0, 1] += 0.5


@pytest.mark.parametrize(
    "distances, method, options, match",
    [
        (_NAN, "dbscan", {"eps": 1.0}, "non-finite"),
        (np.zeros((3, 4)), "dbscan", {"eps": 1.0}, "square"),
        (np.zeros((1, 1)), "dbscan", {"eps": 1.0}, "N >= 2"),
        (_ASYMMETRIC, "dbscan", {"eps": 1.0}, "not symmetric"),
        (_GOOD + np.eye(5), "dbscan", {"eps": 1.0}, "diagonal"),
        (-_GOOD, "dbscan", {"eps": 1.0}, "negative"),
        (_GOOD, "dbscan", {"eps": 0.0}, "eps must be"),
        (_GOOD, "dbscan", {"eps": -1.0}, "eps must be"),
        (_GOOD, "dbscan", {"eps_scaled": 0.0}, "eps_scaled must be"),
        (_GOOD, "dbscan", {"eps_std": -0.2}, "eps_std must be"),
        (_GOOD, "dbscan", {"num_clusters": 6}, r"num_clusters must be in \[1, N=5\]"),
        (_GOOD, "dbscan", {"num_clusters": 0}, "num_clusters must be"),
        (_GOOD, "complete", {"num_clusters": 6}, "num_clusters must be"),
        (_GOOD, "complete", {"threshold": 0.0}, "threshold must be"),
        (_GOOD, "dbscan", {}, "exactly one of"),
        (_GOOD, "dbscan", {"eps": 1.0, "eps_std": 0.2}, "exactly one of"),
        (_GOOD, "dbscan", {"num_clusters": 2, "min_samples": 2}, "min_samples=1"),
        (_GOOD, "dbscan", {"eps": 1.0, "min_samples": 0}, "min_samples"),
        (_GOOD, "dbscan", {"eps": 1.0, "radius": 2}, "unknown options"),
        (_GOOD, "ward", {}, "known methods"),
    ],
)
def test_bad_input_raises_clear_value_error(distances, method, options, match):
    with pytest.raises(ValueError, match=match):
        cluster(distances, method, **options)


@pytest.mark.parametrize(
    "options", [{"eps": "1"}, {"num_clusters": 2.0}, {"eps": 1, "min_samples": 1.5}]
)
def test_wrong_option_types_raise_type_error(options):
    with pytest.raises(TypeError):
        cluster(_GOOD, "dbscan", **options)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_figures_write_png_files(tmp_path):
    images = np.random.default_rng(7).random((9, 8, 8))
    labels = cluster(_euclidean(_BLOBS), "dbscan", eps=1.0).labels
    matrix = plot_distance_matrix(_euclidean(_BLOBS), labels, tmp_path / "matrix.png")
    gray = plot_clusters(images, labels, tmp_path / "sub" / "gray.png", max_columns=2)
    color = plot_clusters(np.repeat(images[..., None], 3, axis=-1), labels, tmp_path / "color.png")
    for path in (matrix, gray, color):
        assert _is_png(path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "color.png",
        "gray.png",
        "matrix.png",
        "sub",
    ]


def test_figures_reject_mismatched_labels(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        plot_distance_matrix(np.zeros((3, 3)), [0, 1], tmp_path / "m.png")
    with pytest.raises(ValueError, match="labels"):
        plot_clusters(np.zeros((3, 4, 4)), [0, 1], tmp_path / "c.png")
