"""Tests for graycnn.distance: each metric against an independent formula."""

import warnings

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graycnn import distance


def _images(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _explicit_imed(images, sigma):
    """float64 reference: the dense (HW x HW) Gaussian metric, one pair at a time."""
    images = np.asarray(images, np.float64)
    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    positions = np.stack([ys.ravel(), xs.ravel()], axis=1).astype(np.float64)
    sq = np.sum((positions[:, None] - positions[None]) ** 2, axis=-1)
    metric = np.exp(-sq / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    # Channels are independent: flatten each channel as its own (HW,) vector.
    flat = images.transpose(0, 3, 1, 2).reshape(n, c, h * w)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            diff = flat[i] - flat[j]
            out[i, j] = np.sqrt(np.einsum("ck,kl,cl->", diff, metric, diff))
    return out


def _assert_off_diagonal_close(actual, expected, rtol):
    off = ~np.eye(len(expected), dtype=bool)
    np.testing.assert_allclose(np.asarray(actual)[off], expected[off], rtol=rtol, atol=0)
    np.testing.assert_array_equal(np.diagonal(np.asarray(actual)), 0.0)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("shape", [(6, 8, 8), (5, 6, 7), (4, 5, 6, 3)])
def test_imed_matches_explicit_metric_float32(shape, sigma):
    images = _images(shape)
    got = distance.pairwise(images, "imed", sigma=sigma)
    assert got.dtype == jnp.float32
    _assert_off_diagonal_close(got, _explicit_imed(images, sigma), rtol=1e-5)


def test_imed_matches_explicit_metric_float64():
    images = np.random.default_rng(1).random((5, 7, 6))
    with jax.enable_x64(True):
        got = np.asarray(distance.pairwise(images, "imed", sigma=1.3))
    assert got.dtype == np.float64
    _assert_off_diagonal_close(got, _explicit_imed(images, 1.3), rtol=1e-10)


def test_imed_default_sigma_is_one():
    images = _images((4, 8, 8))
    np.testing.assert_array_equal(
        distance.pairwise(images, "imed"), distance.pairwise(images, "imed", sigma=1.0)
    )


def test_gaussian_metric_sqrt_squares_to_metric():
    root = distance.gaussian_metric_sqrt(9, 1.0)
    d = np.arange(9)[:, None] - np.arange(9)[None, :]
    g1 = np.exp(-(d**2) / 2.0) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(root @ root, g1, atol=1e-13)
    np.testing.assert_allclose(root, root.T, atol=1e-15)


@pytest.mark.parametrize("metric", sorted(distance.METRICS))
@pytest.mark.parametrize("shape", [(7, 8, 8), (5, 9, 10, 3)])
def test_every_metric_is_a_distance_matrix(metric, shape):
    got = np.asarray(distance.pairwise(_images(shape, seed=2), metric))
    n = shape[0]
    assert got.shape == (n, n)
    np.testing.assert_array_equal(got, got.T)
    np.testing.assert_array_equal(np.diagonal(got), 0.0)
    assert np.all(got >= 0)
    off = ~np.eye(n, dtype=bool)
    assert np.all(got[off] > 0)  # random images are all different


def test_mse_matches_numpy():
    images = _images((6, 5, 7, 2))
    expected = np.mean(
        (images[:, None].astype(np.float64) - images[None].astype(np.float64)) ** 2,
        axis=(2, 3, 4),
    )
    np.testing.assert_allclose(distance.pairwise(images, "mse"), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "shape, options, filter_size",
    [
        ((5, 8, 8), {}, 8),  # the default 11 is clamped to the 8 x 8 image
        ((5, 16, 12), {"filter_size": 5, "filter_sigma": 1.0}, 5),
        ((4, 12, 12, 3), {"data_range": 2.0}, 11),
    ],
)
def test_ssim_matches_one_dm_pix_call(shape, options, filter_size):
    images = _images(shape, seed=3)
    got = np.asarray(distance.pairwise(images, "ssim", **options))
    i, j = 1, 3
    one = images[..., None] if images.ndim == 3 else images
    expected = 1.0 - dm_pix.ssim(
        jnp.asarray(one[i]),
        jnp.asarray(one[j]),
        max_val=options.get("data_range", 1.0),
        filter_size=filter_size,
        filter_sigma=options.get("filter_sigma", 1.5),
    )
    np.testing.assert_allclose(got[i, j], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[j, i], expected, rtol=1e-5, atol=1e-6)


def test_ssim_identical_images_are_at_distance_zero():
    images = np.repeat(_images((1, 8, 8)), 3, axis=0)
    np.testing.assert_allclose(distance.pairwise(images, "ssim"), 0.0, atol=1e-6)


# float64 is computed in float64: tests/test_reliability_fields.py.
@pytest.mark.parametrize("dtype", [np.float16, np.uint8, np.int32])
def test_other_dtypes_give_float32_without_warnings(dtype):
    images = (_images((3, 8, 8)) * 100).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = distance.pairwise(images, "mse")
    assert got.dtype == jnp.float32
    expected = distance.pairwise(images.astype(np.float32), "mse")
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_inputs_are_not_mutated_and_lists_accepted():
    images = _images((4, 6, 6))
    before = images.copy()
    from_list = distance.pairwise(list(images), "mse")
    np.testing.assert_array_equal(images, before)
    np.testing.assert_array_equal(from_list, distance.pairwise(images, "mse"))


@pytest.mark.parametrize("metric", sorted(distance.METRICS))
def test_nan_is_rejected(metric):
    images = _images((4, 8, 8))
    images[2, 3, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        distance.pairwise(images, metric)


@pytest.mark.parametrize(
    "images, match",
    [
        ([np.zeros((8, 8)), np.zeros((8, 9))], "same shape"),
        (np.zeros((1, 8, 8)), "at least 2"),
        (np.zeros((8, 8)), "expected shape"),
        (np.zeros((2, 3, 8, 8, 1)), "expected shape"),
        (np.zeros((3, 0, 8)), "empty"),
        (np.array([["a"] * 4] * 3), "real numbers"),
    ],
)
def test_bad_images_are_rejected(images, match):
    with pytest.raises(ValueError, match=match):
        distance.pairwise(images, "mse")


def test_unknown_metric_lists_known_ones():
    with pytest.raises(
        ValueError, match=r"known metrics: \['correlation', 'imed', 'mse', 'ssim'\]"
    ):
        distance.pairwise(_images((3, 4, 4)), "l1")


@pytest.mark.parametrize(
    "metric, options, match",
    [
        ("imed", {"sigma": 0.0}, "sigma"),
        ("imed", {"sigma": -1.0}, "sigma"),
        ("ssim", {"filter_size": 9}, "filter_size"),
        ("ssim", {"filter_size": 0}, "filter_size"),
        ("ssim", {"data_range": 0.0}, "data_range"),
        ("ssim", {"data_range": 0.5}, "data_range"),  # images span ~[0, 1]
        ("ssim", {"filter_sigma": 0.0}, "filter_sigma"),
    ],
)
def test_bad_options_are_rejected(metric, options, match):
    with pytest.raises(ValueError, match=match):
        distance.pairwise(_images((3, 8, 8)), metric, **options)


def test_correlation_matches_numpy_corrcoef():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 5))
    # Item 1 is a positive multiple of item 0 plus an offset: distance 0 after centering.
    images = np.stack([base, 3.0 * base + 2.0, -base, *rng.normal(size=(3, 6, 5))])
    d = np.asarray(distance.pairwise(images, "correlation"))
    expected = 1.0 - np.corrcoef(images.reshape(6, -1))
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(d, expected, atol=1e-5)
    assert d[0, 1] == pytest.approx(0.0, abs=1e-5) and d[0, 2] == pytest.approx(2.0, abs=1e-5)
