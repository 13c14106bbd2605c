"""Hostile input to receptive fields, distances and visualize (issue 33).

Each case names the argument or flag at fault in one line, before any long work, instead
of NaN fields, a ZeroDivisionError, an out-of-memory blur kernel or a silently rounded
number.
"""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_distance import _explicit_imed
from test_receptive_field import _random_variables

from graycnn import cluster, distance
from graycnn.models import ModelConfig, build_model
from graycnn.receptive_field import gradient_ascent
from graycnn.study.figures.receptive_fields import plot_color_and_gray, plot_receptive_fields
from graycnn.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "graycnn", "assets", "densenet_tiny_color")
HWC = (32, 32, 3)


@pytest.fixture(scope="module")
def densenet():
    config = ModelConfig("densenet_test")
    return build_model(config), _random_variables(config, 0)


# (argument, value, the message's rule): every one is refused before any compile.
NUMBERS = [
    ("step_size", float("inf"), "step_size must be a finite number > 0, got inf"),
    ("step_size", float("nan"), "step_size must be a finite number > 0, got nan"),
    ("step_size", 0.0, "step_size must be a finite number > 0, got 0.0"),
    ("blur_sigma", float("nan"), r"blur_sigma must be a finite number in \[0, 32\]"),
    ("blur_sigma", 1e9, r"blur_sigma must be a finite number in \[0, 32\].*got 1000000000.0"),
    ("blur_sigma", -1.0, r"blur_sigma must be a finite number in \[0, 32\]"),
    ("tv_weight", float("inf"), "tv_weight must be a finite number >= 0, got inf"),
    ("tv_weight", -0.5, "tv_weight must be a finite number >= 0, got -0.5"),
    ("noise_scale", float("nan"), "noise_scale must be a finite number >= 0, got nan"),
    ("noise_offset", float("-inf"), "noise_offset must be a finite number, got -inf"),
    ("steps", float("nan"), r"steps must be an integer in 0..2147483647, got nan"),
    ("steps", 2**31, r"steps must be an integer in 0..2147483647, got 2147483648"),
    ("steps", 2.5, r"steps must be an integer in 0..2147483647, got 2.5"),
    ("seed", -1, r"seed must be an integer in 0..2147483647, got -1"),
    ("jitter", 10**9, r"jitter must be an integer in 0..32 .*got 1000000000"),
    ("jitter", True, r"jitter must be an integer in 0..32 .*got True"),
    ("chunk_size", 0, "chunk_size must be an integer >= 1, got 0"),
    ("chunk_size", -3, "chunk_size must be an integer >= 1, got -3"),
    ("memory_bytes", 0, "memory_bytes must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize(
    "name, value, match", NUMBERS, ids=[f"{name}_{value!r}" for name, value, _ in NUMBERS]
)
def test_bad_numbers_are_refused_naming_the_argument(densenet, name, value, match):
    model, variables = densenet
    with pytest.raises(ValueError, match=match):
        gradient_ascent(model, variables, 2, image_shape=HWC, **{"steps": 2, name: value})


def test_empty_filters_and_devices_are_refused(densenet):
    model, variables = densenet
    with pytest.raises(
        ValueError, match=r"filters must be a non-empty list of indices in \[0, 4\)"
    ):
        gradient_ascent(model, variables, 2, image_shape=HWC, filters=[])
    with pytest.raises(ValueError, match="filters must be integer indices of block1/layer1/conv"):
        gradient_ascent(model, variables, 2, image_shape=HWC, filters=[1.7])  # was filter 1
    with pytest.raises(ValueError, match="devices: give at least one device"):
        gradient_ascent(model, variables, 2, image_shape=HWC, devices=[])


def test_nan_weights_are_refused_naming_the_leaf(densenet):
    model, variables = densenet
    bad = jax.tree.map(np.array, variables)
    bad["params"]["block1"]["layer1"]["conv"]["kernel"][0, 0, 0, 2] = np.nan
    with pytest.raises(ValueError, match="variables: params/block1/layer1/conv/kernel holds NaN"):
        gradient_ascent(model, bad, 2, image_shape=HWC, steps=1)
    bad = jax.tree.map(jnp.asarray, variables)  # jax.Arrays too
    bn = bad["batch_stats"]["block1"]["layer1"]["bn"]
    bn["var"] = bn["var"].at[0].set(jnp.inf)
    with pytest.raises(ValueError, match="variables: batch_stats/block1/layer1/bn/var holds NaN"):
        gradient_ascent(model, bad, 2, image_shape=HWC, steps=1)


def test_a_diverging_ascent_names_the_layer_and_filters(densenet):
    model, variables = densenet
    # Finite, but the first step throws the images to ~1e38, past float32 in the next.
    with pytest.raises(
        ValueError,
        match=r"ascent at layer block1/layer1/conv diverged to NaN or inf for filters 3, 1; "
        r"use a smaller step_size \(now 1e\+38\) or fewer steps",
    ):
        gradient_ascent(
            model, variables, 2, image_shape=HWC, steps=3, step_size=1e38, filters=[3, 1]
        )
    # The same start climbs with the default step: finite, so no error.
    result = gradient_ascent(model, variables, 2, image_shape=HWC, steps=3, filters=[3, 1])
    assert np.all(np.isfinite(result.images)) and np.all(np.isfinite(result.objective))


def test_image_shapes_the_model_cannot_take_name_image_shape(densenet):
    model, variables = densenet
    # densenet_test halves the image in 3 transitions: 4x4 -> 2 -> 1 -> 0 (was a TypeError
    # from lax.reduce_window).
    with pytest.raises(
        ValueError,
        match=r"image_shape \(4, 4, 3\) is too small .* reduce the 4x4 image to 0x0 \(at "
        r"transition3\), and head fails",
    ):
        gradient_ascent(model, variables, 2, image_shape=(4, 4, 3), steps=1)
    # 1 channel for 3-channel kernels (was flax's ScopeParamShapeError).
    with pytest.raises(
        ValueError,
        match=r"image_shape \(32, 32, 1\) does not fit the model's variables: .* "
        r"params/stem/kernel is \(3, 3, 3, 8\), the model makes \(3, 3, 1, 8\)",
    ):
        gradient_ascent(model, variables, 2, image_shape=(32, 32, 1), steps=1)
    for shape in [(0, 32, 3), (32, 32), (32.5, 32, 3)]:
        with pytest.raises(ValueError, match=r"image_shape must be \(H, W, C\)"):
            gradient_ascent(model, variables, 2, image_shape=shape, steps=1)
    # The smallest size the head takes (16 -> 2x2) still works.
    small = gradient_ascent(model, variables, 2, image_shape=(16, 16, 3), steps=1, filters=[0])
    assert small.fields.shape == (1, 16, 16, 3) and np.isfinite(small.objective).all()


def _visualize(tmp_path, *flags: str, checkpoint: str = CHECKPOINT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.visualize", f"--checkpoint={checkpoint}",
         "--layers=2", f"--outdir={tmp_path / 'out'}", "--steps=2", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    "flag, message",
    [
        # ZeroDivisionError traceback.
        ("--chunk_size=0", "error: --chunk_size must be an integer >= 1, got 0"),
        # A Gaussian kernel of 4e9 taps: out of memory.
        (
            "--blur_sigma=1e9",
            "error: --blur_sigma must be a finite number in [0, 32] (pixels: a wider blur "
            "flattens every 32x32 field), got 1000000000.0",
        ),
        # The error was printed inside the progress bar, which was redrawn after it.
        ("--step_size=-1", "error: --step_size must be a finite number > 0, got -1.0"),
    ],
    ids=["chunk_size_0", "blur_sigma_1e9", "step_size_-1"],
)
@pytest.mark.slow
def test_visualize_refuses_bad_flags_before_any_work(tmp_path, flag, message):
    result = _visualize(tmp_path, flag)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == message
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "out")  # checked before --outdir is made


@pytest.mark.slow
def test_visualize_error_mid_run_is_the_last_line(densenet, tmp_path):
    # A diverging ascent fails while the bars are drawn; they close before the error.
    # (densenet_test: 4 filters at layer 2 compile faster than densenet_tiny's 18.)
    ckpt = checkpoint.save_model(str(tmp_path / "ckpt"), ModelConfig("densenet_test"), densenet[1])
    result = _visualize(tmp_path, "--step_size=1e38", checkpoint=ckpt)
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: the gradient ascent at layer block1/layer1/conv diverged")
    assert "use a smaller step_size (now 1e+38) or fewer steps" in last
    assert not os.path.exists(tmp_path / "out")  # the empty --outdir is removed


# distance.pairwise computed float64 input in float32 (JAX's x64 mode is off by default).


def _float64_images(seed: int = 0, offset: float = 1000.0) -> np.ndarray:
    """Differences of ~1e-3 on top of `offset`: float32 (ulp 6e-5 at 1000) keeps ~4
    digits of them at best, float64 all but ~1e-13."""
    return offset + np.random.default_rng(seed).random((4, 6, 6)) * 1e-3


def _ssim_reference(a: np.ndarray, b: np.ndarray, data_range: float, size: int) -> float:
    """SSIM of two (H, W) images in float64, window by window from the definition (a
    Gaussian window of sigma 1.5, 'valid' positions, the mean of the map), with
    centered variances: no cancellation of large means."""
    taps = np.exp(-0.5 * ((np.arange(size) - size // 2) / 1.5) ** 2)
    weights = np.outer(taps, taps) / np.outer(taps, taps).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(a.shape[0] - size + 1):
        for j in range(a.shape[1] - size + 1):
            pa, pb = a[i : i + size, j : j + size], b[i : i + size, j : j + size]
            ma, mb = (weights * pa).sum(), (weights * pb).sum()
            va, vb = (weights * (pa - ma) ** 2).sum(), (weights * (pb - mb) ** 2).sum()
            cov = (weights * (pa - ma) * (pb - mb)).sum()
            values.append(
                (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return float(np.mean(values))


def _references(images: np.ndarray) -> dict:
    """Independent float64 formulas for mse and correlation."""
    flat = images.reshape(len(images), -1)
    return {
        "mse": ((flat[:, None] - flat[None]) ** 2).mean(axis=-1),
        "correlation": 1.0 - np.corrcoef(flat),
    }


@pytest.mark.parametrize("metric", ["mse", "correlation", "imed"])
def test_float64_images_are_computed_in_float64(metric):
    images = _float64_images()
    if metric == "imed":
        expected = _explicit_imed(images, 1.0)  # the dense (HW x HW) metric, float64
    else:
        expected = _references(images)[metric]
    off = ~np.eye(len(images), dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "float64 is not available" truncation
        got = distance.pairwise(images, metric)
    assert got.dtype == np.float64 and not jax.config.jax_enable_x64  # x64 is back off
    np.testing.assert_allclose(got[off], expected[off], rtol=1e-9)
    # The same numbers in float32 are measurably off: what float64 input used to get.
    in_float32 = np.asarray(distance.pairwise(images.astype(np.float32), metric))
    assert np.max(np.abs(in_float32[off] - expected[off]) / expected[off]) > 1e-3


def test_float64_ssim_is_computed_in_float64():
    # dm_pix's variances are E[x^2] - E[x]^2, ~1e-7 here: at an offset of 10 (squares
    # ~100) float64 keeps them to ~1e-6, float32 not at all.
    images = _float64_images(1, offset=10.0)
    options = {"data_range": 1e-3, "filter_size": 5}
    got = distance.pairwise(images, "ssim", **options)
    assert got.dtype == np.float64
    expected = 1.0 - _ssim_reference(images[0], images[2], 1e-3, 5)
    assert got[0, 2] == pytest.approx(expected, abs=1e-5)
    in_float32 = np.asarray(distance.pairwise(images.astype(np.float32), "ssim", **options))
    assert abs(in_float32[0, 2] - expected) > 0.05


# Metric options that gave NaN, inf or all-zero distances, or were taken as numbers.
OPTIONS = [
    # inf distances (the 1/sigma scale leaves float32)
    ("imed", {"sigma": 1e-20}, r"sigma must be a finite number in \[1e-06, 1e\+06\] \(pixels\)"),
    # all distances exactly 0
    ("imed", {"sigma": 1e20}, r"sigma must be a finite number in \[1e-06, 1e\+06\].*got 1e\+20"),
    ("imed", {"sigma": True}, r"sigma must be a finite number .*got True"),
    ("imed", {"sigma": "2"}, r"sigma must be a finite number .*got '2'"),
    # an even window underflows to 0 / 0: NaN
    (
        "ssim",
        {"filter_size": 4, "filter_sigma": 0.03},
        "filter_sigma must be a finite number >= 0.1",
    ),
    ("ssim", {"filter_sigma": float("inf")}, "filter_sigma must be a finite number >= 0.1"),
    # (k data_range)^2 overflows float32: inf / inf = NaN
    ("ssim", {"k1": 1e30}, r"k1=1e\+30 with data_range=1 puts SSIM's constant"),
    ("ssim", {"data_range": 1e30}, r"k1=0.01 with data_range=1e\+30 puts SSIM's constant"),
    # (k data_range)^2 underflows to 0: flat pairs are 0 / 0 = NaN
    ("ssim", {"k2": 1e-30}, r"k2=1e-30 with data_range=1 .* = 1e-60 outside the range of float32"),
    ("ssim", {"k2": float("nan")}, "k2 must be a finite number > 0, got nan"),
    ("ssim", {"data_range": -1.0}, "data_range must be a finite number > 0, got -1.0"),
    ("ssim", {"filter_size": True}, r"filter_size must be an int in \[1, min\(H, W\) = 8\]"),
]


@pytest.mark.parametrize("metric, options, match", OPTIONS, ids=[f"{m}_{o}" for m, o, _ in OPTIONS])
def test_metric_options_out_of_range_are_refused(metric, options, match):
    images = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    images[1] = 0.25  # a flat image: SSIM's constants are all that keeps it finite
    images[2] = 0.75
    with pytest.raises(ValueError, match=match):
        distance.pairwise(images, metric, **options)


def test_metric_options_at_the_bounds_give_the_exact_distances():
    images = np.random.default_rng(0).random((3, 8, 8))
    off = ~np.eye(3, dtype=bool)
    for sigma in (1e-6, 1e6):  # the ends of IMED's range, against the dense metric
        got = np.asarray(distance.pairwise(images.astype(np.float32), "imed", sigma=sigma))
        np.testing.assert_allclose(got[off], _explicit_imed(images, sigma)[off], rtol=1e-5)
    # filter_sigma 0.1: a one-pixel window, so SSIM is its per-pixel formula.
    got = np.asarray(distance.pairwise(images, "ssim", filter_size=3, filter_sigma=0.1))
    a, b = images[0, 1:-1, 1:-1], images[1, 1:-1, 1:-1]  # 'valid' positions of a 3x3 window
    c1, c2 = 0.01**2, 0.03**2
    per_pixel = (2 * a * b + c1) * c2 / ((a**2 + b**2 + c1) * c2)  # variances are 0
    assert got[0, 1] == pytest.approx(1.0 - per_pixel.mean(), abs=1e-9)


@pytest.mark.parametrize(
    "rule, value, scale",
    [("eps_std", 1e10, 1e300), ("eps_std", 0.2, 1e300), ("eps_scaled", 1e10, 1e300)],
)
def test_cluster_rules_that_overflow_eps_name_the_rule(rule, value, scale):
    points = np.random.default_rng(0).random((6, 3))
    d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)) * scale
    # Was sklearn's "The 'eps' parameter of DBSCAN must be a float in the range (0.0, inf)".
    with pytest.raises(ValueError, match=rf"{rule}={value!r} gives eps = inf for distances up to"):
        cluster.cluster(d, "dbscan", **{rule: value})
    # The same rule on the same distances scaled to ~1 clusters.
    assert cluster.cluster(d / scale, "dbscan", **{rule: value}).num_clusters >= 1


@pytest.mark.parametrize(
    "options, match",
    [
        ({"columns": 0}, r"columns must be an integer in 1..6, got 0"),  # was the default
        ({"columns": -1}, r"columns must be an integer in 1..6, got -1"),  # "figure size"
        ({"columns": 10**6}, r"columns must be an integer in 1..6, got 1000000"),  # 1e6 axes
        ({"dpi": float("nan")}, r"dpi must be a finite number in \[1, 1200\], got nan"),
        ({"dpi": 1e4}, r"dpi must be a finite number in \[1, 1200\], got 10000.0"),  # GBs
    ],
)
def test_figure_layout_numbers_are_refused(tmp_path, options, match):
    fields = np.random.default_rng(0).random((6, 8, 8, 3))
    for plot in (plot_receptive_fields, plot_color_and_gray):
        with pytest.raises(ValueError, match=match):
            plot(fields, tmp_path / "fig.png", **options)
    assert not os.listdir(tmp_path)
