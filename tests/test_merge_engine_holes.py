"""Merges that were silently wrong or refused for the wrong reason on unseen models
(issue 33): grouped convs, a conv applied to its own output, fixed-size per-channel
variables, the reason a refusal gives first, and ops taught with `graph.register_rule`.

Exactness is the repo's usual check: filters tied within each cluster (identical
filters and per-channel parameters) merge to a network with the same logits.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import Primitive
from jax.interpreters import mlir
from test_merge_helpers import perturb, tie_clusters

from graycnn import graph, merge, nnx_adapter
from graycnn.tree import flatten

ATOL = 1e-5
SHAPE = (1, 6, 6, 2)


def _setup(model, shape=SHAPE):
    variables = perturb(model.init(jax.random.key(0), jnp.zeros(shape)))
    return variables, graph.trace(model, variables, shape)


def _logits(model, variables, shape=SHAPE) -> np.ndarray:
    x = np.random.default_rng(1).uniform(0, 1, (3, *shape[1:])).astype(np.float32)
    return np.asarray(model.apply(variables, x), np.float64)


def _merged_logits(model, variables, layer, labels, shape=SHAPE) -> np.ndarray:
    merged = merge.merge_layer(model, variables, layer, labels, input_shape=shape)
    return _logits(graph.rebuild(model, merged, shape), merged, shape)


class Grouped(nn.Module):
    """conv1 -> a conv of 2 groups (3 filters each) -> conv2 -> mean -> dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        x = nn.relu(nn.Conv(6, (3, 3), feature_group_count=2, name="gconv")(x))
        x = nn.Conv(3, (3, 3), name="conv2")(x)
        return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))


def test_grouped_conv_is_merged_exactly_within_its_groups():
    model = Grouped()
    variables, g = _setup(model)
    assert g.layers["gconv"].groups == 2
    # Group 0 (filters 0..2) holds clusters 0 and 2, group 1 clusters 1 and 3: merged
    # channel 1 must land in group 1, so the plan renumbers the clusters by group.
    labels = np.array([0, 2, 0, 1, 3, 1])
    plan = merge.plan_merge(g, "gconv", labels)
    np.testing.assert_array_equal(plan.labels, [0, 1, 0, 2, 3, 2])
    tied = tie_clusters(g, variables, "gconv", labels)
    after = _merged_logits(model, tied, "gconv", labels)
    np.testing.assert_allclose(after, _logits(model, tied), atol=ATOL, rtol=0)
    merged = merge.merge_layer(model, tied, "gconv", labels, input_shape=SHAPE)
    assert flatten(merged)["params/gconv/kernel"].shape == (3, 3, 2, 4)
    # Untied filters: the same-widths form computes the narrow merged network.
    narrow = plan.apply(variables)
    expected = _logits(graph.rebuild(model, narrow, SHAPE), narrow)
    assert np.max(np.abs(expected - _logits(model, variables))) > 1e-3  # not a no-op
    wide = plan.apply(variables, keep_widths=True)
    np.testing.assert_allclose(_logits(model, wide), expected, atol=ATOL, rtol=0)


def test_grouped_conv_refuses_clusters_across_groups_and_unequal_groups():
    model = Grouped()
    _, g = _setup(model)
    with pytest.raises(
        ValueError,
        match=r"cannot merge conv 'gconv': gconv is a grouped conv \(2 groups of 3 filters\) "
        r"and cluster 0 mixes groups \[0, 1\] \(filters \[0, 4\]\)",
    ):
        merge.plan_merge(g, "gconv", [0, 1, 1, 2, 0, 3])
    with pytest.raises(
        ValueError, match=r"gconv is a grouped conv .* the labels keep \[2, 3\] per group"
    ):
        merge.plan_merge(g, "gconv", [0, 0, 1, 2, 3, 4])
    with pytest.raises(
        ValueError, match=r"cannot prune conv 'gconv': .* the kept filters are \[2, 1\] per group"
    ):
        merge.plan_prune(g, "gconv", [0, 1, 3])


def test_a_grouped_consumer_is_named_as_the_reason():
    model = Grouped()
    _, g = _setup(model)
    # conv1 is read by the grouped conv only: the refusal names it first, not the
    # classifier guess "has no traced consumers".
    with pytest.raises(
        ValueError,
        match=r"^cannot merge conv 'conv1': conv1: a grouped or depthwise conv reads the "
        r"channels \(in Conv 'gconv'\)",
    ):
        merge.plan_merge(g, "conv1", [0, 0, 1, 2])


class _Scan(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        return jax.lax.scan(lambda c, _: (2 * c, None), x, None, length=2)[0].mean((1, 2))


class _Reshape(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        x = x.reshape((*x.shape[:3], 2, 2)).sum(-1)
        return nn.Dense(2, name="head")(nn.Conv(3, (3, 3), name="conv2")(x).mean((1, 2)))


@pytest.mark.parametrize(
    "model, reason",
    [
        (_Scan(), r"control flow 'scan' \(nn.scan, lax.scan, a loop or lax.cond\) is not followed"),
        (_Reshape(), "reshape reshapes the channel axis other than by flattening it last"),
    ],
)
def test_refusals_name_the_real_reason_first(model, reason):
    _, g = _setup(model)
    with pytest.raises(ValueError, match=rf"^cannot merge conv 'conv1': conv1: {reason}"):
        merge.plan_merge(g, "conv1", [0, 0, 1, 2])


class SharedInSequence(nn.Module):
    """One conv module applied to its own output: y = conv(conv(x))."""

    pre: bool = False

    @nn.compact
    def __call__(self, x):
        if self.pre:
            x = nn.Conv(3, (3, 3), name="conv0")(x)
        conv = nn.Conv(3, (3, 3), name="conv")
        x = conv(nn.relu(conv(x)))
        return nn.Dense(2, name="head")(nn.Conv(3, (3, 3), name="conv2")(x).mean((1, 2)))


@pytest.mark.parametrize(
    "pre, layer, inputs",
    [
        (False, "conv", r"values whose channels are not traced, e.g. the image; channels of conv"),
        (True, "conv", "channels of conv0; channels of conv"),
        (True, "conv0", "channels of conv0; channels of conv"),
    ],
)
def test_a_conv_applied_to_its_own_output_is_refused(pre, layer, inputs):
    model, shape = SharedInSequence(pre), (1, 6, 6, 3)
    _, g = _setup(model, shape)
    # Refused at plan time, so neither the narrow merge nor keep_widths=True is built.
    with pytest.raises(
        ValueError,
        match=rf"cannot merge conv '{layer}': {layer}: module 'conv' applies its kernel "
        rf"params/conv/kernel to 2 different inputs \({inputs}\)",
    ):
        merge.plan_merge(g, layer, [0, 0, 1])


class SharedBatchNorm(nn.Module):
    """One BatchNorm normalizing two convs whose outputs are concatenated."""

    @nn.compact
    def __call__(self, x):
        bn = nn.BatchNorm(use_running_average=True, name="bn")
        x = jnp.concatenate([bn(nn.Conv(4, (3, 3), name=f"conv{i}")(x)) for i in (1, 2)], -1)
        return nn.Dense(2, name="head")(nn.Conv(3, (3, 3), name="conv3")(x).mean((1, 2)))


def test_a_batchnorm_shared_between_convs_is_refused():
    _, g = _setup(SharedBatchNorm())
    with pytest.raises(
        ValueError,
        match=r"cannot merge conv 'conv1': batch_stats/bn/mean axis 0 is read with 2 different "
        r"channel layouts \(module 'bn' is shared between layers\)",
    ):
        merge.plan_merge(g, "conv1", [0, 0, 1, 2])


class Scaled(nn.Module):
    """conv1's output times a per-channel variable of a size fixed by the module
    (`fixed`) or read off the input."""

    fixed: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        size = 4 if self.fixed else x.shape[-1]
        x = x * self.param("s", nn.initializers.ones, (size,))
        return nn.Dense(2, name="head")(nn.Conv(3, (3, 3), name="conv2")(x).mean((1, 2)))


def test_a_fixed_size_per_channel_variable_is_refused_at_plan_time():
    model = Scaled(fixed=True)
    _, g = _setup(model)
    message = (
        r"cannot merge conv 'conv1' to 3 filters: params/s would be \(3,\), but the model "
        r"makes \(4,\)"
    )
    with pytest.raises(ValueError, match=message):
        merge.plan_merge(g, "conv1", [0, 0, 1, 2])
    with pytest.raises(
        ValueError, match=r"cannot prune conv 'conv1' to 2 filters: params/s would be \(2,\)"
    ):
        merge.plan_prune(g, "conv1", [0, 2])
    # Sized off its input, the same variable follows the merge, exactly.
    model = Scaled(fixed=False)
    variables, g = _setup(model)
    tied = tie_clusters(g, variables, "conv1", [0, 0, 1, 2])
    after = _merged_logits(model, tied, "conv1", [0, 0, 1, 2])
    np.testing.assert_allclose(after, _logits(model, tied), atol=ATOL, rtol=0)


def _primitive(name, impl):
    """A JAX primitive the tracer has never seen, computing `impl`."""
    p = Primitive(name)
    p.def_impl(impl)
    p.def_abstract_eval(
        lambda x: jax.core.ShapedArray(impl(jnp.zeros(x.shape, x.dtype)).shape, x.dtype)
    )
    mlir.register_lowering(p, mlir.lower_fun(impl, multiple_results=False))
    return p


SWISH = _primitive("graycnn_test_swish", lambda x: x * jax.nn.sigmoid(x))
# Max over pairs of rows: (N, H, W, C) -> (N, H / 2, W, C), channel by channel.
ROWPOOL = _primitive("graycnn_test_rowpool", lambda x: jnp.maximum(x[:, ::2], x[:, 1::2]))


class Custom(nn.Module):
    """conv1 -> BN -> a custom primitive -> conv2 -> mean -> dense."""

    op: Primitive

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
        x = self.op.bind(nn.BatchNorm(use_running_average=True, name="bn")(x))
        return nn.Dense(2, name="head")(nn.Conv(3, (3, 3), name="conv2")(x).mean((1, 2)))


@pytest.mark.parametrize("op, kind", [(SWISH, "elementwise"), (ROWPOOL, "channelwise")])
def test_a_registered_custom_primitive_is_merged_exactly(op, kind):
    model, labels = Custom(op), [0, 1, 0, 2]
    variables, g = _setup(model)
    with pytest.raises(ValueError, match=rf"primitive '{op.name}' reads its channels"):
        merge.plan_merge(g, "conv1", labels)
    graph.register_rule(op, kind)
    try:
        variables, g = _setup(model)
        assert g.consumers("conv1") == ["conv2"]
        tied = tie_clusters(g, variables, "conv1", labels)
        after = _merged_logits(model, tied, "conv1", labels)
        np.testing.assert_allclose(after, _logits(model, tied), atol=ATOL, rtol=0)
        # Sensitive: the same merge of untied filters moves the logits.
        moved = _merged_logits(model, variables, "conv1", labels)
        assert np.max(np.abs(moved - _logits(model, variables))) > 1e-3
    finally:
        graph.register_rule(op, None)
    _, g = _setup(model)
    with pytest.raises(ValueError, match=rf"primitive '{op.name}' reads its channels"):
        merge.plan_merge(g, "conv1", labels)


def test_register_rule_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"rule must be one of \['channelwise', 'elementwise'\]"):
        graph.register_rule("graycnn_test_swish", "pointwise")
    with pytest.raises(
        TypeError,
        match="primitive must be a JAX primitive, its name or a Flax module class, got int",
    ):
        graph.register_rule(3, "elementwise")
    with pytest.raises(TypeError, match="rule must be a rule name, a function or None"):
        graph.register_rule("graycnn_test_swish", 3)


class _NNXGrouped(nnx.Module):
    """Grouped, as an nnx.Module."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.gconv = nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=rngs)
        self.conv2 = nnx.Conv(6, 3, (3, 3), rngs=rngs)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.gconv(self.conv1(x)))
        return self.head(self.conv2(x).mean((1, 2)))


def test_an_nnx_grouped_conv_is_merged_exactly_within_its_groups():
    module, labels = _NNXGrouped(nnx.Rngs(0)), [0, 2, 0, 1, 3, 1]
    model, variables, _ = nnx_adapter.adapt(module, None)
    tied = nnx_adapter.to_module(
        module, tie_clusters(graph.trace(model, variables, SHAPE), variables, "gconv", labels)
    )
    merged = merge.merge_layer(tied, None, "gconv", labels, input_shape=SHAPE)
    assert merged.gconv.kernel.shape == (3, 3, 2, 4)
    x = np.random.default_rng(1).uniform(0, 1, (3, *SHAPE[1:])).astype(np.float32)
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(tied(x)), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"cluster 0 mixes groups \[0, 1\]"):
        merge.merge_layer(tied, None, "gconv", [0, 1, 1, 2, 0, 3], input_shape=SHAPE)


class SortRows(nn.Module):
    """Sorts each channel's columns along the height, keeps every other row: the
    tracer refuses its 'sort', though channel c of the output reads channel c only."""

    scaled: bool = False

    @nn.compact
    def __call__(self, x):
        if self.scaled:  # a per-channel variable inside the module, sized off its input
            x = x * self.param("s", nn.initializers.ones, (x.shape[-1],))
        return jnp.sort(x, axis=1)[:, ::2]


class WithModule(nn.Module):
    """conv1 -> BN -> SortRows -> conv2 -> mean -> dense."""

    scaled: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=True, name="bn")(x)
        x = SortRows(self.scaled, name="rows")(x)
        return nn.Dense(2, name="head")(nn.Conv(3, (3, 3), name="conv2")(x).mean((1, 2)))


def test_a_registered_module_is_merged_exactly_as_one_op():
    model, labels = WithModule(), [0, 1, 0, 2]
    refused = r"primitive 'sort' reads its channels and is not supported .* \(in SortRows 'rows'\)"
    with pytest.raises(ValueError, match=refused):
        merge.plan_merge(_setup(model)[1], "conv1", labels)
    graph.register_rule(SortRows, "channelwise")
    try:
        variables, g = _setup(model)
        assert g.consumers("conv1") == ["conv2"] and not g.problems
        tied = tie_clusters(g, variables, "conv1", labels)
        after = _merged_logits(model, tied, "conv1", labels)
        np.testing.assert_allclose(after, _logits(model, tied), atol=ATOL, rtol=0)
        moved = _merged_logits(model, variables, "conv1", labels)
        assert np.max(np.abs(moved - _logits(model, variables))) > 1e-3
        # Inside a registered module nothing is followed: its own per-channel variable
        # is refused by name rather than left unmerged.
        _, g = _setup(WithModule(scaled=True))
        with pytest.raises(ValueError, match=r"params/rows/s would be \(4,\), but the model makes"):
            merge.plan_merge(g, "conv1", labels)
    finally:
        graph.register_rule(SortRows, None)
    with pytest.raises(ValueError, match=refused):
        merge.plan_merge(_setup(model)[1], "conv1", labels)
