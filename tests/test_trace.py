"""Tests for graycnn.graph.trace: consumers found from the jaxpr, for our models and others."""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_merge_helpers import any_model

from graycnn import graph, merge
from graycnn.graph import Segment
from graycnn.models import ModelConfig, build_model, init_variables, one_pass_bn


def _segments(g, leaf):
    (segments,) = {u.segments for u in g.uses if u.leaf == leaf}
    return segments


def test_densenet_fan_out_through_concatenation():
    model, variables, shape = any_model("densenet_tiny")
    g = graph.trace(model, variables, shape)
    assert g.consumers("stem") == [
        "block1/layer1/conv",
        "block1/layer2/conv",
        "block1/layer3/conv",
        "transition1/conv",
    ]
    assert g.group("stem") == ("stem",)
    # The transition's BN reads [stem 36, layer1 18, layer2 18, layer3 18] in that order.
    assert _segments(g, "batch_stats/transition1/bn/var") == (
        Segment("stem", 0, 36),
        Segment("block1/layer1/conv", 0, 18),
        Segment("block1/layer2/conv", 0, 18),
        Segment("block1/layer3/conv", 0, 18),
    )
    stem_uses = {(u.leaf, u.axis, u.kind) for u in g.uses_of("stem")}
    assert ("params/block1/layer3/conv/kernel", 2, "contract") in stem_uses
    assert ("params/stem/kernel", 3, "produce") in stem_uses
    assert ("params/block1/layer2/bn/scale", 0, "elementwise") in stem_uses
    assert len(stem_uses) == 1 + 4 + 4 * 4  # kernel, 4 consumers, 4 BNs of 4 vectors
    assert g.consumers("block3/layer3/conv") == ["transition3/conv"]
    assert set(g.problems) == {"head/conv"}  # its channels are the logits


def test_resnet_residual_adds_form_groups():
    model, variables, shape = any_model("resnet20")
    g = graph.trace(model, variables, shape)
    stage1 = ("stem/conv",) + tuple(f"stage1_block{b}/conv2/conv" for b in (1, 2, 3))
    assert g.group("stage1_block2/conv2/conv") == stage1
    assert g.group("stage2_block1/shortcut/conv") == (
        "stage2_block1/conv2/conv",
        "stage2_block1/shortcut/conv",
        "stage2_block2/conv2/conv",
        "stage2_block3/conv2/conv",
    )
    assert g.group("stage1_block1/conv1/conv") == ("stage1_block1/conv1/conv",)
    # The head reads the last group through a spatial mean.
    assert "head" in g.consumers("stage3_block1/shortcut/conv")
    assert not g.problems


def test_user_models_vgg_flatten_and_residual():
    model, variables, shape = any_model("vgg")
    g = graph.trace(model, variables, shape)
    assert g.consumers("conv1") == ["conv2"]
    assert g.consumers("conv2") == ["fc1"]
    # Flattening (4, 4, 5) puts channels fastest: 16 copies of conv2's 5 channels.
    assert _segments(g, "params/fc1/kernel") == (Segment("conv2", 0, 5),) * 16
    assert _segments(g, "params/conv2/bias") == (Segment("conv2", 0, 5),)
    model, variables, shape = any_model("residual")
    g = graph.trace(model, variables, shape)
    assert g.group("res3") == ("stem", "res2", "res3")
    assert g.consumers("stem") == ["res1", "res3", "head"]  # res3 reads its own group


class _Probe(nn.Module):
    """conv1 (4 filters) -> op -> conv2 -> mean -> dense."""

    op: Callable

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        x = self.op(x)
        x = nn.Conv(3, (3, 3), name="conv2")(x)
        return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))


def _depthwise(x):
    return nn.Conv(4, (3, 3), feature_group_count=4, name="dw")(x)


def _gate(x):
    return x * jax.nn.sigmoid(jnp.mean(x, axis=(1, 2), keepdims=True) @ jnp.ones((4, 4)))


@pytest.mark.parametrize(
    "op, message",
    [
        (nn.LayerNorm(name="ln"), "reduce_sum reduces over the channel axis"),
        (lambda x: x[..., :3], "reads channels 0..2 of conv1, not all 4"),
        (lambda x: jnp.sort(x, axis=-1), "primitive 'sort' reads its channels"),
        (_depthwise, "a grouped or depthwise conv reads the channels"),
        (lambda x: x + jnp.arange(4.0), "per-channel constant"),
        (_gate, "contracts the channels with a non-variable tensor"),
    ],
)
def test_ops_that_mix_channels_are_refused_by_name(op, message):
    model = _Probe(op)
    shape = (1, 6, 6, 2)
    variables = model.init(jax.random.key(0), jnp.zeros(shape))
    with pytest.raises(ValueError, match=message):
        merge.merge_layer(model, variables, "conv1", [0, 0, 1, 2], input_shape=shape)
    # conv2, downstream of the op, is still mergeable.
    merge.merge_layer(model, variables, "conv2", [0, 0, 1], input_shape=shape)


def test_trace_needs_shapes_only():
    model, variables, shape = any_model("densenet_test")
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    g = graph.trace(model, shapes, shape)
    assert g.widths["stem"] == 8 and g.batchnorms["block1/layer1/bn"] == 1e-3
    assert g.convs[:2] == ("stem", "block1/layer1/conv")
    assert np.isfinite(g.layers["stem"].flops)


def test_cpu_speedups_in_a_traced_forward_are_refused_by_name():
    model, variables, shape = any_model("densenet_test")
    # An eval step's model takes the dot convolutions in eval mode too.
    assert build_model(ModelConfig("densenet_test")).conv_dots == "train"  # conftest's opt-in
    fast_eval = build_model(ModelConfig("densenet_test"), eval_step=True)
    assert fast_eval.conv_dots == "always"
    with pytest.raises(ValueError, match="conv 'stem' computes with graycnn.models.conv's dots"):
        graph.trace(fast_eval, variables, shape)

    class OnePass(nn.Module):  # a one-pass BatchNorm in the forward the tracer reads
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), name="conv1")(x)
            x = one_pass_bn.BatchNorm(one_pass=True, use_running_average=False, name="bn")(x)
            return nn.Conv(2, (1, 1), name="conv2")(x)

    x = jnp.zeros((1, 8, 8, 3))
    one_pass = OnePass()
    variables = one_pass.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="BatchNorm 'bn' is one-pass"):
        graph.trace(one_pass, variables, x.shape)
    config = ModelConfig("densenet_test")
    plain = build_model(config)  # the model every stage traces: speed-ups in train mode only
    assert plain.bn_one_pass
    assert graph.trace(plain, init_variables(config, jax.random.key(0)), shape).convs[0] == "stem"
