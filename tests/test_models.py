import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graycnn.layers import conv_layers, layer_output_fn, resolve_layer
from graycnn.models import MODELS, TEST_MODELS, ModelConfig, build_model, count_params
from graycnn.models.one_pass_bn import BatchNorm, batch_moments, normalize


def _shapes(config):
    model = build_model(config)
    return model, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(config.input_shape))


@pytest.mark.parametrize("name", sorted(MODELS) + sorted(TEST_MODELS))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_model_maps_images_to_logits(name, in_channels):
    config = ModelConfig(name, in_channels=in_channels)
    model, variables = _shapes(config)
    logits = jax.eval_shape(model.apply, variables, jnp.zeros((2, 32, 32, in_channels)))
    assert logits.shape == (2, 10)
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize(
    "in_channels, widths, expected",
    [
        (3, {}, 995_230),  # the study's model.summary(), BN statistics included
        (1, {}, 994_582),
        (1, {"stem": 21}, 964_237),  # the study's layer-1 merged model
        (1, {"stem": 20, "block1/layer1/conv": 12}, 950_046),  # layers 1+2 merged
    ],
)
def test_densenet_seed_parameter_counts(in_channels, widths, expected):
    _, variables = _shapes(ModelConfig("densenet_seed", in_channels=in_channels, widths=widths))
    assert count_params(variables) == expected


def test_conv_layers_are_numbered_in_forward_order():
    config = ModelConfig("densenet_seed")
    paths = conv_layers(build_model(config), config.input_shape)
    assert len(paths) == 1 + 48 + 3 + 1
    assert paths[0] == "stem" and paths[1] == "block1/layer1/conv"
    assert paths[12] == "block1/layer12/conv" and paths[13] == "transition1/conv"
    assert paths[-1] == "head/conv"
    assert resolve_layer(2, paths) == resolve_layer("params/block1/layer1/conv/kernel", paths)
    with pytest.raises(ValueError, match="layer 54 does not exist.*1..53"):
        resolve_layer(54, paths)
    with pytest.raises(ValueError, match="'block9' is not a conv layer"):
        resolve_layer("block9", paths)


def test_width_override_changes_only_that_conv():
    config = ModelConfig("densenet_test", widths={"stem": 5})
    model, variables = _shapes(config)
    assert variables["params"]["stem"]["kernel"].shape == (3, 3, 3, 5)
    assert variables["params"]["block1"]["layer1"]["conv"]["kernel"].shape == (3, 3, 5, 4)
    out = jax.eval_shape(layer_output_fn(model, "stem"), variables, jnp.zeros((2, 32, 32, 3)))
    assert out.shape == (2, 32, 32, 5)


def test_unknown_model_and_bad_channels():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*densenet_seed"):
        ModelConfig("vgg")
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        ModelConfig("resnet20", in_channels=2)


def _bn_case(one_pass, x, variables):
    bn = BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3, one_pass=one_pass)

    def loss(params, x):
        y, updates = bn.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape) / y.size), (y, updates)

    (_, (y, updates)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        variables["params"], x
    )
    return y, updates["batch_stats"], grads


@pytest.mark.slow
def test_one_pass_batchnorm_equals_flax_batchnorm():
    rng = np.random.default_rng(0)
    # Channels with an offset, as after a ReLU: the fast variance's cancellation case.
    x = jnp.asarray(rng.normal(2.0, 1.5, (6, 5, 4, 3)), jnp.float32)
    variables = {
        "params": {"scale": jnp.array([0.5, 1.0, 2.0]), "bias": jnp.array([0.1, -0.2, 0.3])},
        "batch_stats": {"mean": jnp.array([0.1, 0.2, 0.3]), "var": jnp.array([1.0, 2.0, 0.5])},
    }
    ours = _bn_case(True, x, variables)
    flax = _bn_case(False, x, variables)
    assert jax.tree.structure(ours) == jax.tree.structure(flax)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(flax), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Inference never takes the one-pass path: exactly nn.BatchNorm.
    bn = BatchNorm(use_running_average=True, one_pass=True)
    np.testing.assert_array_equal(
        bn.apply(variables, x), nn.BatchNorm(use_running_average=True).apply(variables, x)
    )


@pytest.mark.slow
def test_shared_moments_and_normalize_match_the_plain_formula():
    # Two BatchNorms of the same channels, with one batch_moments call between them (as a
    # dense block shares them), against autodiff of the textbook formula computed twice.
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(2.0, 3.0, (4, 5, 5, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 4, 5, 5, 6)), jnp.float32)
    scale, bias = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)

    def plain(x, scale, bias):
        mean = x.mean(axis=(0, 1, 2))
        var = ((x - mean) ** 2).mean(axis=(0, 1, 2))
        y = [(x - mean) / jnp.sqrt(var + 1e-3) * scale * (k + 1) + bias for k in range(2)]
        return jnp.sum(w[0] * y[0]) + jnp.sum(w[1] * y[1] ** 2)

    def shared(x, scale, bias):
        mean, var = batch_moments(x)
        y = [normalize(x, mean, var, scale * (k + 1), bias, 1e-3) for k in range(2)]
        return jnp.sum(w[0] * y[0]) + jnp.sum(w[1] * y[1] ** 2)

    want = jax.value_and_grad(plain, argnums=(0, 1, 2))(x, scale, bias)
    got = jax.value_and_grad(shared, argnums=(0, 1, 2))(x, scale, bias)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))


@pytest.mark.slow
def test_densenet_one_pass_batchnorm_keeps_variables_and_function():
    config = ModelConfig("densenet_test")
    model = build_model(config).clone(bn_one_pass=False)
    fast = model.clone(bn_one_pass=True)
    x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    assert jax.tree.structure(fast.init(jax.random.key(0), x)) == jax.tree.structure(variables)

    def loss(m, params):
        logits, updates = m.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(logits**2), updates

    # Jitted: op by op, the DenseNet's backward pass dispatches for ~20 s.
    def grad_of(m):
        return jax.jit(jax.value_and_grad(lambda p: loss(m, p), has_aux=True))

    (value, stats), grads = grad_of(model)(variables["params"])
    (value_f, stats_f), grads_f = grad_of(fast)(variables["params"])
    np.testing.assert_allclose(value_f, value, rtol=1e-5)
    pairs = zip(jax.tree.leaves((stats_f, grads_f)), jax.tree.leaves((stats, grads)), strict=True)
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))
    np.testing.assert_array_equal(fast.apply(variables, x), model.apply(variables, x))
