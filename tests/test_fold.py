"""Tests for graycnn.fold: the RGB -> gray fold of the first conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_merge_helpers import VGG, any_model, images, logits, perturb

from graycnn import fold
from graycnn.layers import layer_output_fn
from graycnn.training import data
from graycnn.tree import flatten

ATOL = 1e-4
A, B = np.array([0.9, 1.05, 1.1]), np.array([10.0, -5.0, -20.0])


@pytest.mark.parametrize(
    "name", ["densenet_test", "resnet_test", "densenet_tiny", "resnet20", "vgg", "residual"]
)
def test_sum_fold_equals_color_model_on_replicated_gray(name):
    model, variables, shape = any_model(name)
    gray = fold.fold_to_gray(model, variables, "sum", input_shape=shape)
    g = images(shape[:3] + (1,))
    np.testing.assert_allclose(
        logits(model, gray, g),
        logits(model, variables, np.repeat(g, 3, axis=-1)),
        atol=ATOL,
        rtol=0,
    )


def test_mean_and_luma_folds_are_what_the_docs_say():
    model, variables, shape = any_model("densenet_test")
    g = images(shape[:3] + (1,))
    kernel = np.asarray(variables["params"]["stem"]["kernel"])
    for method, weights in (("mean", np.full(3, 1 / 3)), ("luma", np.array(fold.LUMA_WEIGHTS))):
        folded = fold.fold_to_gray(model, variables, method, input_shape=shape)
        np.testing.assert_allclose(
            folded["params"]["stem"]["kernel"][..., 0, :],
            np.einsum("hwcf,c->hwf", kernel, weights),
            rtol=1e-6,
        )
        # = the color model fed channel c = w_c * gray.
        np.testing.assert_allclose(
            logits(model, folded, g),
            logits(model, variables, (g * weights).astype(np.float32)),
            atol=ATOL,
            rtol=0,
        )


@pytest.mark.parametrize("batchnorm", [True, False], ids=["into_bn_mean", "into_bias"])
def test_fit_fold_is_exact_on_the_fitted_lines_with_valid_padding(batchnorm):
    model = VGG(padding="VALID", batchnorm=batchnorm)
    shape = (1, 8, 8, 3)
    variables = perturb(model.init(jax.random.key(0), jnp.zeros(shape)))
    gray = fold.fold_to_gray(model, variables, "fit", fit=(A, B), input_shape=shape)
    g = images(shape[:3] + (1,))
    color = (A * g + B).astype(np.float32)
    np.testing.assert_allclose(logits(model, gray, g), logits(model, variables, color), atol=ATOL)
    # The constant really went somewhere: without it the logits differ.
    plain = fold.fold_to_gray(model, variables, "luma", input_shape=shape)
    plain["params"]["conv1"]["kernel"] = gray["params"]["conv1"]["kernel"]
    assert np.max(np.abs(logits(model, plain, g) - logits(model, variables, color))) > 10 * ATOL


@pytest.mark.parametrize(
    "name, path", [("densenet_tiny", "block1/layer1/conv"), ("residual", "res1")]
)
def test_fit_fold_is_exact_away_from_the_border_with_same_padding(name, path):
    # densenet_tiny scales pixels by 1/255, the residual model maps them to x/255 - 0.5;
    # the first conv's constant reaches a BN mean (through a concatenation for DenseNet).
    model, variables, shape = any_model(name)
    gray = fold.fold_to_gray(model, variables, "fit", fit=(A, B), input_shape=shape)
    g = images(shape[:3] + (1,))
    out = jax.jit(layer_output_fn(model, path))
    color = np.asarray(out(variables, (A * g + B).astype(np.float32)))
    folded = np.asarray(out(gray, g))
    # Two 3x3 convs from the input: a 2-pixel ring sees the padding.
    np.testing.assert_allclose(folded[:, 2:-2, 2:-2], color[:, 2:-2, 2:-2], atol=ATOL)
    assert np.max(np.abs(folded - color)) > 10 * ATOL  # the documented border effect


def test_fit_gray_coefficients():
    sample = data.load_dataset("cifar10_sample", "validation").images[:200]
    a, b = fold.fit_gray_coefficients(sample, batch_size=64)
    luma = np.array(fold.LUMA_WEIGHTS)
    # Gray is linear in the channels, so the fits add up to the identity.
    np.testing.assert_allclose(luma @ a, 1.0, atol=1e-4)
    np.testing.assert_allclose(luma @ b, 0.0, atol=1e-2)
    g = sample.astype(np.float64) @ luma
    for c in range(3):
        slope, intercept = np.polyfit(g.ravel(), sample[..., c].ravel().astype(np.float64), 1)
        np.testing.assert_allclose([a[c], b[c]], [slope, intercept], rtol=1e-3, atol=1e-2)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        fold.fit_gray_coefficients(sample[..., :1])


class _NoBias(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x))
        return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))


class _PerChannelNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = (x - jnp.array([120.0, 110.0, 100.0])) / 60.0
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))


def test_fold_bad_input():
    model, variables, shape = any_model("densenet_test")
    with pytest.raises(ValueError, match="unknown fold method 'max'"):
        fold.fold_to_gray(model, variables, "max", input_shape=shape)
    with pytest.raises(ValueError, match="method 'fit' needs fit="):
        fold.fold_to_gray(model, variables, "fit", input_shape=shape)
    gray = fold.fold_to_gray(model, variables, "sum", input_shape=shape)
    with pytest.raises(ValueError, match="params/stem/kernel is \\(3, 3, 1, 8\\)"):
        fold.fold_to_gray(model, gray, "sum", input_shape=shape)
    for module, message in (
        (_NoBias(), "read first by a bias add or a BatchNorm mean subtraction"),
        (_PerChannelNorm(), "per-channel input normalization"),
    ):
        params = module.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
        with pytest.raises(ValueError, match=message):
            fold.fold_to_gray(module, params, "fit", fit=(A, B), input_shape=(1, 6, 6, 3))
        fold.fold_to_gray(module, params, "sum", input_shape=(1, 6, 6, 3))  # always fine
    before = {k: np.array(v) for k, v in flatten(variables).items()}
    fold.fold_to_gray(model, variables, "fit", fit=(A, B), input_shape=shape)
    for key, leaf in flatten(variables).items():
        np.testing.assert_array_equal(leaf, before[key])
