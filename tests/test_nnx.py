"""Tests for Flax NNX models: trace, layer numbering, fold, merge, rebuild, FLOPs and
receptive fields take an nnx.Module, and are exact as for linen.

The models are written here with nnx only; their variables are perturbed (random BN
statistics, scales and biases) so that merging them is really exercised.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_merge_helpers import perturb, tie_clusters

from graycnn import fold, graph, merge, nnx_adapter
from graycnn.layers import conv_layers, layer_output_fn
from graycnn.receptive_field import gradient_ascent
from graycnn.tree import flatten

ATOL = 1e-4
A, B = np.array([0.9, 1.05, 1.1]), np.array([10.0, -5.0, -20.0])


class VGG(nnx.Module):
    """conv-BN-ReLU-maxpool, conv(bias)-ReLU, flatten, dense-ReLU-dense; 8x8 images."""

    def __init__(self, rngs: nnx.Rngs, padding: str = "SAME", in_channels: int = 3):
        self.conv1 = nnx.Conv(in_channels, 6, (3, 3), padding=padding, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(6, epsilon=1e-3, rngs=rngs)
        self.conv2 = nnx.Conv(6, 5, (3, 3), padding=padding, rngs=rngs)
        side = 4 if padding == "SAME" else 1
        self.fc1 = nnx.Linear(5 * side * side, 7, rngs=rngs)
        self.fc2 = nnx.Linear(7, 3, rngs=rngs)

    def conv2_output(self, x: jax.Array) -> jax.Array:
        """What conv2 computes, called directly (the receptive-field reference)."""
        x = nnx.relu(self.bn1(self.conv1(x / 255.0)))
        return self.conv2(nnx.max_pool(x, (2, 2), strides=(2, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv2_output(x))
        x = x.reshape((x.shape[0], -1))
        return self.fc2(nnx.relu(self.fc1(x)))


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(6, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv2(nnx.relu(self.bn(self.conv1(x))))


class Residual(nnx.Module):
    """A stem and two residual blocks in an nnx.List; the head is defined first, so
    attribute order is not call order; dropout (with its RNG state) before the head."""

    def __init__(self, rngs: nnx.Rngs):
        self.head = nnx.Linear(6, 3, rngs=rngs)
        self.stem = nnx.Conv(3, 6, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(6, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem(x / 255.0 - 0.5)))
        for block in self.blocks:
            x = nnx.relu(x + block(x))
        return self.head(self.dropout(jnp.mean(x, axis=(1, 2))))


class DenseLayer(nnx.Module):
    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.bn = nnx.BatchNorm(channels, rngs=rngs)
        self.conv = nnx.Conv(channels, 4, (3, 3), use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return self.conv(nnx.relu(self.bn(x, use_running_average=not train)))


class Dense(nnx.Module):
    """DenseNet-like: every layer reads the concatenation of all before it; its
    __call__ takes `train`, as a linen-style model would."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.layers = nnx.List([DenseLayer(4 + 4 * i, rngs) for i in range(2)])
        self.transition_bn = nnx.BatchNorm(12, rngs=rngs)
        self.transition = nnx.Conv(12, 5, (1, 1), use_bias=False, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self.stem(x / 255.0)
        for layer in self.layers:
            x = jnp.concatenate([x, layer(x, train)], axis=-1)
        x = self.transition(nnx.relu(self.transition_bn(x, use_running_average=not train)))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return self.head(jnp.mean(x, axis=(1, 2)))


class UNet(nnx.Module):
    """U-Net-like: an encoder conv, a strided conv down, a ConvTranspose back up, its
    output concatenated with the encoder's (the skip), a decoder conv, a head."""

    def __init__(self, rngs: nnx.Rngs):
        self.enc = nnx.Conv(3, 6, (3, 3), use_bias=False, rngs=rngs)
        self.enc_bn = nnx.BatchNorm(6, rngs=rngs)
        self.down = nnx.Conv(6, 5, (3, 3), strides=2, rngs=rngs)
        self.up = nnx.ConvTranspose(5, 4, (2, 2), strides=2, rngs=rngs)
        self.dec = nnx.Conv(10, 4, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        skip = nnx.relu(self.enc_bn(self.enc(x / 255.0)))
        y = nnx.relu(self.up(nnx.relu(self.down(skip))))
        x = nnx.relu(self.dec(jnp.concatenate([y, skip], axis=-1)))
        return self.head(jnp.mean(x, axis=(1, 2)))


class Remat(nnx.Module):
    """A stem, then a residual block run under nnx.remat (recomputed in backward)."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, 6, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(6, rngs=rngs)
        self.block = Block(rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem(x / 255.0)))
        x = nnx.relu(x + nnx.remat(lambda block, h: block(h))(self.block, x))
        return self.head(jnp.mean(x, axis=(1, 2)))


SHAPE = (1, 8, 8, 3)
MODELS = {"vgg": VGG, "residual": Residual, "dense": Dense, "unet": UNet, "remat": Remat}


def _model(name: str, seed: int = 0) -> nnx.Module:
    """A model of this file with perturbed variables."""
    model = MODELS[name](nnx.Rngs(seed))
    _set(model, perturb(nnx_adapter.to_variables(nnx.state(model)), seed))
    return model


def _set(model: nnx.Module, variables: dict) -> None:
    nnx.update(model, nnx_adapter.to_state(variables, nnx.state(model)))


def _variables(model: nnx.Module) -> dict:
    return nnx_adapter.to_variables(nnx.state(model))


def _logits(model: nnx.Module, images: np.ndarray) -> np.ndarray:
    model.eval()
    return np.asarray(model(jnp.asarray(images)), np.float64)


def _images(channels: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (4, 8, 8, channels)).astype(np.float32)


def _at(model: nnx.Module, path: str) -> nnx.Module:
    for key in path.split("/"):
        model = model[int(key)] if key.isdigit() else getattr(model, key)
    return model


def _labels(width: int) -> np.ndarray:
    """Clusters {0, 2, 5} (or {0, 2} for fewer than 6 filters), {1, 3}, singletons."""
    labels = np.arange(width)
    labels[[2, 5] if width >= 6 else [2]], labels[3] = 0, 1
    return np.unique(labels, return_inverse=True)[1]


def test_layers_are_numbered_by_attribute_path_in_call_order():
    assert conv_layers(_model("residual"), SHAPE) == [
        "stem",
        "blocks/0/conv1",
        "blocks/0/conv2",
        "blocks/1/conv1",
        "blocks/1/conv2",
    ]
    g = graph.trace(_model("dense"), None, SHAPE)
    assert g.conv_order == ("stem", "layers/0/conv", "layers/1/conv", "transition")
    assert g.consumers("stem") == ["layers/0/conv", "layers/1/conv", "transition"]
    assert g.batchnorms == {"layers/0/bn": 1e-5, "layers/1/bn": 1e-5, "transition_bn": 1e-5}
    g = graph.trace(_model("residual"), None, SHAPE)
    assert g.group("stem") == ("stem", "blocks/0/conv2", "blocks/1/conv2")
    assert g.consumers("blocks/0/conv1") == ["blocks/0/conv2"]
    assert "head" in g.consumers("stem") and not g.problems
    with pytest.raises(ValueError, match="layer 9 does not exist.*5:blocks/1/conv2"):
        merge.merge_layer(_model("residual"), None, 9, np.arange(6), input_shape=SHAPE)


CASES = [
    ("vgg", 1),
    ("vgg", "conv2"),  # read through a flatten
    ("residual", "stem"),  # a residual group of three convs
    ("residual", "blocks/1/conv1"),
    ("dense", 1),  # read through concatenations by every later conv
    ("dense", "layers/0/conv"),
    ("unet", "enc"),  # read by the strided conv and, through the skip, by the decoder
    ("unet", "down"),  # read by a ConvTranspose
    ("remat", "stem"),  # a residual group through an nnx.remat body
    ("remat", "block/conv1"),  # inside the remat body
]


@pytest.mark.parametrize("name, layer", CASES)
def test_merging_identical_filters_keeps_logits(name, layer):
    model = _model(name)
    g = graph.trace(model, None, SHAPE)
    path = layer if isinstance(layer, str) else g.conv_order[layer - 1]
    labels = _labels(g.widths[path])
    _set(model, tie_clusters(g, _variables(model), path, labels))
    x = _images()
    before = _logits(model, x)
    merged = merge.merge_layer(model, None, layer, labels, input_shape=SHAPE)
    assert isinstance(merged, type(model)) and merged is not model
    np.testing.assert_allclose(_logits(merged, x), before, atol=ATOL, rtol=0)
    for member in g.group(path):
        assert _at(merged, member).out_features == labels.max() + 1
        assert _at(merged, member).kernel.shape[-1] == labels.max() + 1
    for consumer in g.consumers(path):
        assert _at(merged, consumer).in_features < _at(model, consumer).in_features
    # With an nnx.State: a new State, which rebuild runs to the same logits.
    state = merge.merge_layer(model, nnx.state(model), layer, labels, input_shape=SHAPE)
    assert isinstance(state, nnx.State)
    rebuilt = graph.rebuild(model, state, SHAPE)
    np.testing.assert_array_equal(_logits(rebuilt, x), _logits(merged, x))
    # The test is sensitive: the same clusters of untied filters move the logits.
    loose = merge.merge_layer(_model(name), None, layer, labels, input_shape=SHAPE)
    assert np.max(np.abs(_logits(loose, x) - _logits(_model(name), x))) > 10 * ATOL
    # keep_widths on an nnx.State: that merge in the module's own shapes.
    plan = merge.plan_merge(graph.trace(_model(name), None, SHAPE), layer, labels)
    wide, same = plan.apply(nnx.state(_model(name)), keep_widths=True), _model(name)
    nnx.update(same, wide)
    np.testing.assert_allclose(_logits(same, x), _logits(loose, x), atol=ATOL, rtol=0)


def test_merge_leaves_the_module_alone_and_shares_nothing():
    model = _model("residual")
    before = {k: np.array(v) for k, v in flatten(_variables(model)).items()}
    graphdef = nnx.graphdef(model)
    merged = merge.merge_layers(
        model, None, {1: [0, 0, 1, 1, 2, 3], "blocks/0/conv1": [0, 1, 1, 2]}, input_shape=SHAPE
    )
    assert nnx.graphdef(model) == graphdef
    # The library ran a private eval-mode copy; the module stays in train mode.
    assert (
        model.stem_bn.use_running_average is False and merged.stem_bn.use_running_average is False
    )
    assert model.stem.out_features == 6 and model.blocks[0].conv2.in_features == 4
    assert merged.stem.out_features == 4 and merged.blocks[0].conv2.in_features == 3
    assert merged.stem_bn.num_features == 4 and merged.head.in_features == 4
    merged.stem.kernel[...] = jnp.zeros_like(merged.stem.kernel[...])
    merged.stem_bn.mean[...] = jnp.ones_like(merged.stem_bn.mean[...])
    for key, leaf in flatten(_variables(model)).items():
        np.testing.assert_array_equal(leaf, before[key], err_msg=key)
    # A merged module merges again; its layers keep their numbers.
    twice = merge.merge_layer(merged, None, 1, [0, 0, 1, 2], input_shape=SHAPE)
    assert twice.stem.out_features == 3 and conv_layers(twice, SHAPE) == conv_layers(model, SHAPE)


@pytest.mark.parametrize("name", ["vgg", "residual", "dense"])
def test_sum_fold_equals_the_color_model_on_replicated_gray(name):
    model = _model(name)
    gray = fold.fold_to_gray(model, None, "sum", input_shape=SHAPE)
    first = conv_layers(model, SHAPE)[0]
    assert _at(gray, first).in_features == 1 and _at(model, first).in_features == 3
    g = _images(1)
    np.testing.assert_allclose(
        _logits(gray, g), _logits(model, np.repeat(g, 3, axis=-1)), atol=ATOL, rtol=0
    )
    state = fold.fold_to_gray(model, nnx.state(model), "sum", input_shape=SHAPE)
    np.testing.assert_array_equal(
        nnx_adapter.to_variables(state)["params"][first]["kernel"], _at(gray, first).kernel[...]
    )


def test_fit_fold_goes_into_the_nnx_batchnorm_mean():
    model = VGG(nnx.Rngs(0), padding="VALID")
    _set(model, perturb(_variables(model)))
    gray = fold.fold_to_gray(model, None, "fit", fit=(A, B), input_shape=SHAPE)
    g = _images(1)
    color = (A * g + B).astype(np.float32)
    np.testing.assert_allclose(_logits(gray, g), _logits(model, color), atol=ATOL)
    assert np.max(np.abs(np.asarray(gray.bn1.mean[...]) - np.asarray(model.bn1.mean[...]))) > 0.1


def test_flops_by_hand_before_and_after_a_merge():
    model = _model("vgg")
    conv1 = 2 * (8 * 8 * 6) * (3 * 3 * 3)
    conv2 = 2 * (4 * 4 * 5) * (3 * 3 * 6)
    fc1, fc2 = 2 * 7 * 80, 2 * 3 * 7
    flops = graph.count_flops(model, None, SHAPE)
    assert flops["per_layer"] == {"conv1": conv1, "conv2": conv2, "fc1": fc1, "fc2": fc2}
    assert flops["total"] == 30_538
    assert graph.count_flops(model, nnx.state(model), (16, 8, 8, 3)) == flops
    merged = merge.merge_layer(model, None, "conv1", [0, 1, 1, 2, 3, 3], input_shape=SHAPE)
    after = graph.count_flops(merged, None, SHAPE)["per_layer"]
    assert after["conv1"] == conv1 * 4 // 6 and after["conv2"] == conv2 * 4 // 6
    # The original module counts a merged State too: widths are read off the tree.
    state = merge.merge_layer(model, nnx.state(model), 1, [0, 1, 1, 2, 3, 3], input_shape=SHAPE)
    assert graph.count_flops(model, state, SHAPE)["per_layer"] == after


def test_gradient_ascent_matches_a_direct_grad_of_one_filter():
    model = _model("vgg")
    result = gradient_ascent(model, None, 2, image_shape=(8, 8, 3), steps=5, filters=[4, 1])
    assert result.path == "conv2" and result.images.shape == (2, 8, 8, 3)
    model.eval()

    def objective(x, f):  # the model's own conv2_output, no interception
        return model.conv2_output(x)[0, ..., f].mean()

    grad = jax.jit(jax.grad(objective), static_argnums=1)
    for row, f in enumerate([4, 1]):
        x = jax.random.uniform(jax.random.fold_in(jax.random.key(0), f), (1, 8, 8, 3)) * 20 + 128
        for _ in range(5):
            g = grad(x, f)
            x = x + 0.5 * g / (jnp.sqrt(jnp.mean(g**2)) + 1e-5)
        np.testing.assert_allclose(result.images[row], x[0], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(result.objective[row], objective(x, f), rtol=1e-3)
    out = jax.jit(layer_output_fn(model, "conv2"))(nnx.state(model), _images())
    np.testing.assert_allclose(out, model.conv2_output(_images()), atol=1e-5)


class _SqueezeExcite(nnx.Module):
    """x * sigmoid(W mean(x)): each channel gated by a mix of all channels."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * jax.nn.sigmoid(self.fc(jnp.mean(x, axis=(1, 2))))[:, None, None, :]


class _Probe(nnx.Module):
    """conv1 (4 filters) -> op -> conv2 -> mean -> dense."""

    def __init__(self, op: str, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        if op == "groupnorm":
            self.op = nnx.GroupNorm(4, num_groups=2, rngs=rngs)
        elif op == "squeeze_excite":
            self.op = _SqueezeExcite(rngs)
        else:
            self.op = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 3, (3, 3), rngs=rngs)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv2(self.op(self.conv1(x)))
        return self.head(jnp.mean(x, axis=(1, 2)))


@pytest.mark.parametrize(
    "op, message",
    [
        (
            "groupnorm",
            r"cannot merge conv 'conv1': conv1: reshape reshapes the channel axis other than "
            r"by flattening it last \(in GroupNorm 'op'\)",
        ),
        ("depthwise", r"conv1: a grouped or depthwise conv reads the channels \(in Conv 'op'\)"),
        ("squeeze_excite", r"cannot merge conv 'conv1'"),
    ],
)
def test_ops_that_mix_channels_are_refused_naming_the_module(op, message):
    model = _Probe(op, nnx.Rngs(0))
    shape = (1, 6, 6, 2)
    with pytest.raises(ValueError, match=message):
        merge.merge_layer(model, None, "conv1", [0, 0, 1, 2], input_shape=shape)
    merge.merge_layer(model, None, "conv2", [0, 0, 1], input_shape=shape)  # still fine


class _LinenProbe(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.GroupNorm(2, name="op")(nn.Conv(4, (3, 3), name="conv1")(x))
        return nn.Dense(2, name="head")(jnp.mean(nn.Conv(3, (3, 3), name="conv2")(x), (1, 2)))


def test_linen_refusals_name_the_module_too():
    model, shape = _LinenProbe(), (1, 6, 6, 2)
    variables = model.init(jax.random.key(0), jnp.zeros(shape))
    with pytest.raises(ValueError, match=r"flattening it last \(in GroupNorm 'op'\)"):
        merge.merge_layer(model, variables, "conv1", [0, 0, 1, 2], input_shape=shape)


def test_a_state_that_does_not_fit_names_the_path():
    model = _model("vgg")
    wrong = _variables(model)
    wrong["params"]["conv2"]["kernel"] = np.zeros((3, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"params/conv2/kernel is \(3, 3, 5, 5\)"):
        merge.merge_layer(model, nnx_adapter.to_state(wrong, nnx.state(model)), 1,
                          np.arange(6), input_shape=SHAPE)  # fmt: skip
    with pytest.raises(ValueError, match="tree does not match the model"):
        graph.rebuild(model, nnx.state(_model("residual")), SHAPE)
    nan = jax.tree.map(np.array, _variables(model))
    nan["params"]["fc1"]["kernel"][0, 0] = np.nan
    with pytest.raises(ValueError, match="params/fc1/kernel holds NaN"):
        graph.trace(model, nnx_adapter.to_state(nan, nnx.state(model)), SHAPE)
    with pytest.raises(ValueError, match="variables are required"):
        graph.trace(VGG, None, SHAPE)
