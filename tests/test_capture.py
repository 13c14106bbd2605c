"""Tests for graph.capture, the library's one interception: what it records, that every
inspection of a model goes through it (so compensation and the summary take NNX models,
equal to their linen twins), one source of layer numbers, and the tracer's refusals of
training-mode forwards."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_nnx import MODELS as NNX_MODELS
from test_nnx import SHAPE, _images, _labels, _model, _variables

import graycnn
from graycnn import compensate, graph, merge, nnx_adapter, summary
from graycnn.graph import capture
from graycnn.layers import conv_layers
from graycnn.models import MODELS, TEST_MODELS, ModelConfig, build_model, init_variables
from graycnn.tree import flatten


class LinenVGG(nn.Module):
    """test_nnx's VGG in linen, with the same variable names."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(6, (3, 3), use_bias=False, name="conv1")(x / 255.0)
        x = nn.BatchNorm(use_running_average=not train, epsilon=1e-3, name="bn1")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(5, (3, 3), name="conv2")(x))
        x = nn.relu(nn.Dense(7, name="fc1")(x.reshape((x.shape[0], -1))))
        return nn.Dense(3, name="fc2")(x)


def _twins():
    """(nnx VGG, linen VGG, the variables they share)."""
    model = _model("vgg")
    return model, LinenVGG(), _variables(model)


def test_capture_records_first_calls_inputs_outputs_and_counts():
    model, linen, variables = _twins()
    x = jnp.asarray(_images())
    for m, v in ((model, None), (linen, variables)):
        calls = capture.capture(m, v, x, select=nnx_adapter.CONVS)
        assert list(calls) == ["conv1", "conv2"]
        assert calls["conv1"].input.shape == (4, 8, 8, 3) and calls["conv1"].count == 1
        assert calls["conv2"].output.shape == (4, 4, 4, 5)
        shapes = capture.capture(m, v, jax.ShapeDtypeStruct(x.shape, jnp.float32), {"fc1"})
        assert isinstance(shapes["fc1"].output, jax.ShapeDtypeStruct)
        assert shapes["fc1"].output.shape == (4, 7)
        stopped = capture.capture(m, v, x, stop="conv1")
        assert "conv1" in stopped and "conv2" not in stopped
    linen_out = capture.capture(linen, variables, x, {"conv2"})["conv2"].output
    nnx_out = capture.capture(model, None, x, {"conv2"})["conv2"].output
    np.testing.assert_allclose(nnx_out, linen_out, rtol=1e-5, atol=1e-4)


def test_a_shared_module_is_counted():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            conv = nn.Conv(3, (1, 1), name="shared")
            return conv(conv(x))

    x = jnp.ones((1, 4, 4, 3))
    variables = Twice().init(jax.random.key(0), x)
    assert capture.capture(Twice(), variables, x, {"shared"})["shared"].count == 2


def test_capture_is_the_only_interception_in_the_library():
    root = pathlib.Path(graycnn.__file__).parent
    pattern = re.compile(r"intercept_methods\(|capture_intermediates|_INTERCEPTORS")
    users = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if pattern.search(p.read_text()) and p.name != "capture.py"
    )
    assert users == []
    # nnx_adapter's interception names still import, from capture.
    assert nnx_adapter.intercept_methods is capture.intercept_methods
    assert nnx_adapter.module_path is capture.module_path
    assert nnx_adapter.layer_output_fn is capture.layer_output_fn


@pytest.mark.parametrize("name", sorted({**MODELS, **TEST_MODELS}))
def test_conv_layers_are_the_traced_conv_order(name):
    config = ModelConfig(name)
    model = build_model(config)
    variables = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    g = graph.trace(model, variables, config.input_shape)
    assert tuple(conv_layers(model, config.input_shape)) == g.conv_order
    assert set(g.convs) <= set(g.conv_order)


@pytest.mark.parametrize("name", sorted(NNX_MODELS))
def test_conv_layers_are_the_traced_conv_order_for_nnx(name):
    model = _model(name)
    g = graph.trace(model, None, SHAPE)
    assert tuple(conv_layers(model, SHAPE)) == g.conv_order


def test_summary_of_an_nnx_model_is_its_linen_twins():
    model, linen, variables = _twins()
    rows_nnx = summary.summarize_model(model, None, SHAPE)
    rows_linen = summary.summarize_model(linen, variables, SHAPE)
    kinds = {"Linear": "Dense"}  # NNX's name for a dense layer
    assert [(r.path, kinds.get(r.kind, r.kind), r.output_shape, r.params, r.conv_number)
            for r in rows_nnx] == [
        (r.path, r.kind, r.output_shape, r.params, r.conv_number) for r in rows_linen
    ]  # fmt: skip
    assert [r.path for r in rows_linen] == ["conv1", "bn1", "conv2", "fc1", "fc2"]
    assert [r.conv_number for r in rows_linen] == [1, None, 2, None, None]
    assert rows_linen[0].params == 3 * 3 * 3 * 6 and rows_linen[1].params == 4 * 6


@pytest.mark.parametrize("bn", ["relative", "exact"])
def test_compensate_merge_of_an_nnx_model_is_its_linen_twins(bn):
    model, linen, variables = _twins()
    g = graph.trace(model, None, SHAPE)
    labels = _labels(g.widths["conv1"])
    plan = merge.plan_merge(g, "conv1", labels)
    images = _images(seed=3)
    options = dict(input_shape=SHAPE, bn=bn, holdout=_images(seed=4))
    new_linen, report_linen = compensate.compensate_merge(linen, variables, plan, images, **options)
    new_module, report_module = compensate.compensate_merge(model, None, plan, images, **options)
    new_state, report_state = compensate.compensate_merge(
        model, nnx.state(model), plan, images, **options
    )
    assert isinstance(new_module, type(model)) and isinstance(new_state, nnx.State)
    assert [r["consumer"] for r in report_linen] == ["conv2"]
    for report in (report_module, report_state):
        for got, want in zip(report, report_linen, strict=True):
            assert got.keys() == want.keys() and got["consumer"] == want["consumer"]
            for key in want:
                if key != "consumer":
                    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6)
    # The refit really changed the tree, and both NNX results hold the linen one.
    assert report_linen[0]["error_after"] < report_linen[0]["error_before"]
    want = flatten(new_linen)
    for got in (_variables(new_module), nnx_adapter.to_variables(new_state)):
        flat = flatten(got)
        assert flat.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(flat[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)


class _TrainBN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        x = self.bn(self.conv(x), use_running_average=False)
        return self.head(x.mean(axis=(1, 2)))


class _TrainDropout(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(self.conv(x), deterministic=False).mean(axis=(1, 2)))


@pytest.mark.parametrize(
    "cls, message",
    [
        (_TrainBN, "BatchNorm 'bn' runs in training mode"),
        (_TrainDropout, "Dropout 'drop' is not deterministic"),
    ],
)
def test_the_tracer_refuses_a_training_mode_forward_naming_the_module(cls, message):
    with pytest.raises(ValueError, match=message):
        graph.trace(cls(nnx.Rngs(0)), None, SHAPE)


def test_compensate_takes_an_nnx_module_and_its_merged_state():
    model, linen, variables = _twins()
    plan = merge.plan_merge(graph.trace(model, None, SHAPE), "conv1", _labels(6))
    images, options = _images(seed=3), dict(input_shape=SHAPE, bn="none")
    want, report_linen = compensate.compensate(
        linen, variables, plan.apply(variables), ["conv2"], images, **options
    )
    state = nnx.state(model)
    got, report = compensate.compensate(
        model, state, plan.apply(state), ["conv2"], images, **options
    )
    assert isinstance(got, nnx.State)
    np.testing.assert_allclose(report[0]["error_after"], report_linen[0]["error_after"], rtol=1e-4)
    flat, want = flatten(nnx_adapter.to_variables(got)), flatten(want)
    for key in want:
        np.testing.assert_allclose(flat[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)
