"""Tests for graycnn.receptive_field, its figures and the visualize CLI."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graycnn.layers import layer_output_fn
from graycnn.models import ModelConfig, build_model
from graycnn.receptive_field import (
    deprocess,
    filter_objective,
    gradient_ascent,
    kernel_fields,
    to_gray,
)
from graycnn.study.figures.receptive_fields import plot_color_and_gray, plot_receptive_fields
from graycnn.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HWC = (32, 32, 3)  # the test models take 32x32 color images


def _random_variables(config: ModelConfig, seed: int) -> dict:
    """Random weights without compiling an init: kernels ~ N(0, 1/fan_in), BN statistics
    with means near 0 and variances near 1, so inference-mode BN is not the identity and
    the ReLUs after it stay mostly alive."""
    model = build_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(config.input_shape))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1])
            return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return (0.1 * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def models():
    """name -> (model, variables) with random weights."""
    return {
        name: (build_model(ModelConfig(name)), _random_variables(ModelConfig(name), seed))
        for seed, name in enumerate(["densenet_test", "resnet_test"])
    }


def _study_one_filter(model, variables, path, filters, steps, objective="mean", seed=0):
    """The study's loop, written independently: one filter, one image, plain jax.grad.

    Returns:
        (objective values (F,), final images (F, 32, 32, 3)).
    """
    response = layer_output_fn(model, path)

    def loss(x, f):
        out = response(variables, x)[0, ..., f]
        return out.mean() if objective == "mean" else out[out.shape[0] // 2, out.shape[1] // 2]

    grad = jax.jit(jax.grad(loss))
    values, images = [], []
    for f in filters:
        x = jax.random.uniform(jax.random.fold_in(jax.random.key(seed), f), (1, 32, 32, 3))
        x = x * 20 + 128
        for _ in range(steps):
            g = grad(x, f)
            x = x + 0.5 * g / (jnp.sqrt(jnp.mean(g**2)) + 1e-5)
        values.append(float(loss(x, f)))
        images.append(np.asarray(x[0]))
    return np.array(values), np.array(images)


@pytest.mark.parametrize(
    "name, layer, objective",
    [
        pytest.param("densenet_test", "block1/layer2/conv", "mean", marks=pytest.mark.slow),
        ("densenet_test", "transition1/conv", "center"),
        pytest.param("resnet_test", "stage2_block1/conv1/conv", "mean", marks=pytest.mark.slow),
    ],
)
def test_batched_matches_one_filter_at_a_time(models, name, layer, objective):
    model, variables = models[name]
    result = gradient_ascent(model, variables, layer, image_shape=HWC, objective=objective, steps=6)
    # All filters in one chunk, sharded over the 2 test devices.
    assert result.chunk_size >= len(result.filters)
    values, images = _study_one_filter(model, variables, layer, range(4), 6, objective)
    np.testing.assert_allclose(result.objective[:4], values, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(result.images[:4], images, rtol=0, atol=1e-3)
    # The ascent did climb: the objective grew from the starting noise.
    start = gradient_ascent(model, variables, layer, image_shape=HWC, objective=objective, steps=0)
    assert np.all(result.objective >= start.objective)
    assert np.mean(result.objective - start.objective) > 1e-3


@pytest.mark.slow
def test_loops_chunks_devices_and_subsets_agree(models):
    model, variables = models["densenet_test"]
    full = gradient_ascent(model, variables, 2, image_shape=HWC, steps=4, loop="python")
    others = [
        gradient_ascent(model, variables, 2, image_shape=HWC, steps=4, loop="fori"),
        gradient_ascent(
            model, variables, 2, image_shape=HWC, steps=4, chunk_size=1, devices=jax.devices()[:1]
        ),
        gradient_ascent(
            model, variables, 2, image_shape=HWC, steps=4, chunk_size=3
        ),  # 4 filters padded to 6
    ]
    for other in others:
        np.testing.assert_allclose(other.objective, full.objective, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(other.images, full.images, rtol=0, atol=1e-4)
    subset = gradient_ascent(model, variables, 2, image_shape=HWC, steps=4, filters=[3, 1])
    np.testing.assert_array_equal(subset.filters, [3, 1])
    np.testing.assert_allclose(subset.images, full.images[[3, 1]], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_same_seed_same_images_with_regularizers(models):
    model, variables = models["densenet_test"]
    options = {"steps": 3, "jitter": 2, "blur_sigma": 0.7, "tv_weight": 0.05}
    a = gradient_ascent(model, variables, 3, image_shape=HWC, seed=1, **options)
    b = gradient_ascent(model, variables, 3, image_shape=HWC, seed=1, **options)
    c = gradient_ascent(model, variables, 3, image_shape=HWC, seed=2, **options)
    np.testing.assert_array_equal(a.images, b.images)
    assert np.abs(a.images - c.images).max() > 1.0
    assert np.all(np.isfinite(a.images))
    # Blur smooths: neighbouring pixels differ less than without it.
    plain = gradient_ascent(model, variables, 3, image_shape=HWC, seed=1, steps=3)
    assert (
        np.abs(np.diff(a.images, axis=1)).mean()
        < 0.5 * np.abs(np.diff(plain.images, axis=1)).mean()
    )


@pytest.mark.slow
def test_layer1_mean_gradient_does_not_depend_on_the_input(models):
    """The stem is linear: the study's layer-1 fields are flat colors plus border effects."""
    model, variables = models["densenet_test"]
    response = layer_output_fn(model, "stem")
    filters = jnp.arange(8)

    def grad(x):
        return jax.grad(lambda x: filter_objective(response, variables, x, filters).sum())(x)

    x1 = jax.random.uniform(jax.random.key(1), (8, 32, 32, 3)) * 255
    x2 = jax.random.uniform(jax.random.key(2), (8, 32, 32, 3)) * 20 + 128
    g1, g2 = np.asarray(grad(x1)), np.asarray(grad(x2))
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-12)
    # Interior pixels see every tap: d mean / d x = scale * sum of the kernel over taps / (H W).
    kernel = np.asarray(variables["params"]["stem"]["kernel"])  # (3, 3, 3, F)
    interior = kernel.sum(axis=(0, 1)).T / 255.0 / (32 * 32)  # (F, C)
    np.testing.assert_allclose(g1[:, 1:-1, 1:-1, :], np.broadcast_to(
        interior[:, None, None, :], g1[:, 1:-1, 1:-1].shape), rtol=1e-4)  # fmt: skip
    # Border pixels miss taps: the only structure in the field.
    assert np.abs(g1[:, 0, 1:-1] - interior[:, None, :]).max() > 1e-3 * np.abs(interior).max()
    # So the ascent adds one fixed image to the noise, whatever the noise.
    result = gradient_ascent(model, variables, 1, image_shape=HWC, steps=10)
    start = gradient_ascent(model, variables, 1, image_shape=HWC, steps=0)
    inner = (result.images - start.images)[:, 1:-1, 1:-1]
    np.testing.assert_allclose(inner, np.broadcast_to(inner[:, :1, :1], inner.shape), atol=1e-3)


def test_layer1_exact_alternatives_show_the_kernel(models):
    model, variables = models["densenet_test"]
    kernel = np.moveaxis(np.asarray(variables["params"]["stem"]["kernel"]), -1, 0)
    result = gradient_ascent(model, variables, 1, image_shape=HWC, objective="kernel")
    np.testing.assert_array_equal(result.images, kernel)
    assert result.fields.shape == (8, 3, 3, 3) and np.all(np.isnan(result.objective))
    np.testing.assert_array_equal(kernel_fields(variables, "stem"), kernel)
    # 'center' from a flat start: one step adds the kernel at the center, nothing elsewhere.
    center = gradient_ascent(
        model, variables, 1, image_shape=HWC, objective="center", steps=1, noise_scale=0.0
    )
    added = center.images - 128.0
    patch = added[:, 15:18, 15:18]
    flat_patch, flat_kernel = patch.reshape(8, -1), kernel.reshape(8, -1)
    ratio = (flat_patch * flat_kernel).sum(1) / (flat_kernel**2).sum(1)
    assert np.all(ratio > 0)
    np.testing.assert_allclose(patch, kernel * ratio[:, None, None, None], rtol=1e-4, atol=1e-4)
    outside = added.copy()
    outside[:, 15:18, 15:18] = 0
    assert np.abs(outside).max() == 0.0


@pytest.mark.slow
def test_densenet_seed_field_shapes():
    config = ModelConfig("densenet_seed")
    model, variables = build_model(config), _random_variables(config, 0)
    fields1 = gradient_ascent(model, variables, 1, image_shape=HWC, steps=2).fields
    fields2 = gradient_ascent(model, variables, 2, image_shape=HWC, steps=2).fields
    assert fields1.shape == (36, 32, 32, 3) and fields2.shape == (18, 32, 32, 3)
    assert fields1.dtype == np.float32 and 0 <= fields2.min() and fields2.max() <= 1


def test_deprocess_and_to_gray():
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)) * 30 + 100
    d = np.asarray(deprocess(x))
    np.testing.assert_allclose(d.mean(axis=(1, 2, 3)), 0.5, atol=1e-3)  # rare clipping
    np.testing.assert_allclose(d.std(axis=(1, 2, 3)), 0.1, rtol=1e-3)
    gray = np.asarray(to_gray(x))
    np.testing.assert_allclose(gray[..., 0], x @ [0.2989, 0.587, 0.114], rtol=1e-6)
    assert to_gray(x[..., :1]).shape == (2, 4, 4, 1)
    with pytest.raises(ValueError, match="fields must be"):
        to_gray(x[..., :2])


def test_bad_input_names_the_fault(models):
    model, variables = models["densenet_test"]
    with pytest.raises(ValueError, match="layer 99 does not exist"):
        gradient_ascent(model, variables, 99, image_shape=HWC)
    with pytest.raises(ValueError, match="unknown objective 'max'"):
        gradient_ascent(model, variables, 1, image_shape=HWC, objective="max")
    with pytest.raises(ValueError, match="objective 'kernel' needs the first layer"):
        gradient_ascent(model, variables, 2, image_shape=HWC, objective="kernel")
    with pytest.raises(ValueError, match="filters must be indices in"):
        gradient_ascent(model, variables, 2, image_shape=HWC, filters=[4])


@pytest.mark.slow
def test_figures(tmp_path):
    fields = np.random.default_rng(0).uniform(size=(18, 8, 8, 3))
    paths = [
        plot_receptive_fields(fields, tmp_path / "color.png"),
        plot_receptive_fields(to_gray(fields), tmp_path / "gray.png", indices=np.arange(18) + 5),
        plot_color_and_gray(fields, tmp_path / "sub" / "both.png", "side by side"),
    ]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["color.png", "gray.png", "sub"]  # no temp files
    with pytest.raises(ValueError, match="fields: expected"):
        plot_receptive_fields(fields[..., :2], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="side by side needs color"):
        plot_color_and_gray(fields[..., 0], tmp_path / "bad.png")


@pytest.mark.slow
def test_visualize_cli_writes_figures_and_npz(models, tmp_path):
    model, variables = models["densenet_test"]
    ckpt = checkpoint.save_model(str(tmp_path / "ckpt"), ModelConfig("densenet_test"), variables)
    outdir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.visualize", f"--checkpoint={ckpt}",
         "--layers=1,block1/layer1/conv", f"--outdir={outdir}", "--steps=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    names = sorted(os.listdir(outdir))
    for n in (1, 2):
        for suffix in ("_color.png", "_gray.png", "_color_gray.png", ".npz"):
            assert f"layer{n}{suffix}" in names
    with np.load(outdir / "layer2.npz") as saved:
        assert saved["fields"].shape == (4, 32, 32, 3) and saved["gray"].shape == (4, 32, 32, 1)
        assert str(saved["path"]) == "block1/layer1/conv"
        expected = gradient_ascent(model, variables, 2, image_shape=HWC, steps=3)
        np.testing.assert_allclose(saved["objective"], expected.objective, rtol=1e-5)
