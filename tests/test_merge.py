"""Tests for graycnn.merge: cluster merging is exact, the identity, and strict on input."""

import jax
import numpy as np
import pytest
from test_merge_helpers import any_model, images, logits, project_model, tie_clusters

from graycnn import fold, graph, merge
from graycnn.models import ModelConfig, build_model, count_params, init_variables
from graycnn.study import controls
from graycnn.tree import flatten, unflatten

ATOL = 1e-4
# (model, layer): layer 1 everywhere; a dense layer read through concatenations
# (DenseNet), a residual-group member (ResNet conv2 / res2), a conv read through
# a flatten (VGG conv2), through a ConvTranspose and a skip (U-Net) and through remat.
CASES = [
    ("densenet_test", 1),
    ("densenet_test", "block1/layer1/conv"),
    ("resnet_test", 1),
    ("resnet_test", "stage1_block1/conv2/conv"),
    ("densenet_tiny", 1),
    ("densenet_tiny", "block2/layer1/conv"),
    ("resnet20", "stage1_block1/conv1/conv"),
    ("resnet20", "stage2_block1/conv2/conv"),
    ("vgg", 1),
    ("vgg", 2),
    ("residual", "res2"),
    ("residual", "res1"),
    ("unet", "enc"),  # read by the strided conv and, through the skip, by the decoder
    ("unet", "down"),  # read by a ConvTranspose
    ("remat", "stem"),  # a residual group through an nn.remat body
    ("remat", "block/conv1"),  # inside the remat body
]


def _labels(width: int) -> np.ndarray:
    """Clusters {0, 2, 5} (or {0, 2} for fewer than 6 filters), {1, 3}, singletons."""
    labels = np.arange(width)
    labels[[2, 5] if width >= 6 else [2]], labels[3] = 0, 1
    return np.unique(labels, return_inverse=True)[1]


@pytest.mark.parametrize("name, layer", CASES)
def test_merging_identical_filters_keeps_logits(name, layer):
    model, variables, shape = any_model(name)
    g = graph.trace(model, variables, shape)
    path = layer if isinstance(layer, str) else g.convs[layer - 1]
    labels = _labels(g.widths[path])
    tied = tie_clusters(g, variables, path, labels)
    x = images(shape)
    before = logits(model, tied, x)
    merged = merge.merge_layer(model, tied, layer, labels, input_shape=shape)
    after = logits(graph.rebuild(model, merged, shape), merged, x)
    np.testing.assert_allclose(after, before, atol=ATOL, rtol=0)
    for member in g.group(path):
        assert flatten(merged)[f"params/{member}/kernel"].shape[-1] == labels.max() + 1
    # The test is sensitive: merging the same clusters of untied filters moves logits.
    loose = merge.merge_layer(model, variables, layer, labels, input_shape=shape)
    moved = logits(graph.rebuild(model, loose, shape), loose, x)
    assert np.max(np.abs(moved - logits(model, variables, x))) > 10 * ATOL


@pytest.mark.parametrize("name, layer", [CASES[i] for i in (0, 1, 2, 3, 8, 10, 12, 14)])
def test_keep_widths_computes_the_merged_network(name, layer):
    """The same-widths form of a merge of untied filters gives the narrow merged
    network's logits, in inference and in train mode (batch statistics)."""
    model, variables, shape = any_model(name)
    g = graph.trace(model, variables, shape)
    path = layer if isinstance(layer, str) else g.convs[layer - 1]
    plan = merge.plan_merge(g, layer, _labels(g.widths[path]))
    narrow, wide = plan.apply(variables), plan.apply(variables, keep_widths=True)
    assert jax.tree.map(np.shape, wide) == jax.tree.map(np.shape, variables)
    narrow_model, x = graph.rebuild(model, narrow, shape), images(shape)
    expected = logits(narrow_model, narrow, x)
    assert np.max(np.abs(expected - logits(model, variables, x))) > 10 * ATOL  # not a no-op
    np.testing.assert_allclose(logits(model, wide, x), expected, atol=ATOL, rtol=0)
    if "batch_stats" in variables:

        def train_mode(m, v):
            out, _ = jax.jit(lambda v: m.apply(v, x, train=True, mutable=["batch_stats"]))(v)
            return np.asarray(out, np.float64)

        np.testing.assert_allclose(
            train_mode(model, wide), train_mode(narrow_model, narrow), atol=ATOL, rtol=0
        )


@pytest.mark.parametrize(
    "name", ["densenet_test", "resnet_test", "densenet_tiny", "resnet20", "residual", "vgg"]
)
def test_distinct_labels_are_the_identity(name):
    model, variables, shape = any_model(name)
    width = graph.widths_of(model, variables, shape)
    for path in list(width)[:3]:
        same = merge.merge_layer(model, variables, path, np.arange(width[path]), input_shape=shape)
        for key, leaf in flatten(variables).items():
            np.testing.assert_array_equal(flatten(same)[key], leaf, err_msg=key)
    # A permutation reorders channels consistently: the same function.
    perm = np.random.default_rng(0).permutation(next(iter(width.values())))
    permuted = merge.merge_layer(model, variables, 1, perm, input_shape=shape)
    x = images(shape)
    np.testing.assert_allclose(
        logits(model, permuted, x), logits(model, variables, x), atol=ATOL, rtol=0
    )


def test_merge_does_not_modify_its_input():
    model, variables, shape = project_model("densenet_test")
    before = {k: np.array(v) for k, v in flatten(variables).items()}
    merge.merge_layer(model, variables, 1, np.arange(8) // 2, input_shape=shape)
    for key, leaf in flatten(variables).items():
        np.testing.assert_array_equal(leaf, before[key])


def test_residual_group_is_merged_together():
    model, variables, shape = project_model("resnet_test")
    merged = merge.merge_layer(model, variables, 1, [0, 0, 1, 2], input_shape=shape)
    widths = graph.widths_of(model, merged, shape)
    assert widths["stem/conv"] == widths["stage1_block1/conv2/conv"] == 3
    assert widths["stage1_block1/conv1/conv"] == 4
    # The group's consumers read 3 channels; BN vectors of the group have 3 entries.
    flat = flatten(merged)
    assert flat["params/stage2_block1/shortcut/conv/kernel"].shape == (1, 1, 3, 8)
    assert flat["batch_stats/stage1_block1/conv2/bn/var"].shape == (3,)


def test_merge_batchnorm_closed_forms():
    eps = 1e-3
    mean, var = np.array([1.0, 3.0, 5.0]), np.array([1.0, 4.0, 2.0])
    scale, bias = np.array([2.0, 1.0, 0.5]), np.array([0.5, -1.0, 3.0])
    labels = np.array([0, 0, 1])
    std = np.sqrt(var + eps)
    # 'moments': the merged channel's mean, its std if the members are perfectly
    # correlated, and the mean scale and bias.
    out = merge.merge_batchnorm(mean, var, scale, bias, labels, eps)
    np.testing.assert_allclose(out["mean"], [2.0, 5.0], rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(out["var"] + eps), [std[:2].mean(), std[2]], rtol=1e-12)
    np.testing.assert_allclose(out["scale"], [1.5, 0.5], rtol=1e-12)
    np.testing.assert_allclose(out["bias"], [-0.25, 3.0], rtol=1e-12)
    np.testing.assert_array_equal(out["var"][1], var[2])  # a cluster of one is untouched
    # ... which normalizes z = mean(x_i) to the members' n when x_i = mean_i + std_i n.
    n = np.linspace(-2, 2, 5)
    z = (mean[:2, None] + std[:2, None] * n).mean(axis=0)
    np.testing.assert_allclose((z - out["mean"][0]) / np.sqrt(out["var"][0] + eps), n)
    # 'mean': the study's average of the four tensors.
    study = merge.merge_batchnorm(mean, var, scale, bias, labels, eps, rule="mean")
    np.testing.assert_allclose(study["var"], [2.5, 2.0])
    np.testing.assert_allclose(study["scale"], [1.5, 0.5])
    # 'affine': the average of the members' maps x -> s_i x + t_i, also without
    # scale and bias.
    for sc, bi in ((scale, bias), (None, None)):
        aff = merge.merge_batchnorm(mean, var, sc, bi, labels, eps, rule="affine")
        s_i = (1.0 if sc is None else sc) / std
        t_i = (0.0 if bi is None else bi) - s_i * mean
        s_new = (1.0 if sc is None else aff["scale"]) / np.sqrt(aff["var"] + eps)
        t_new = (0.0 if bi is None else aff["bias"]) - s_new * aff["mean"]
        np.testing.assert_allclose(s_new, [s_i[:2].mean(), s_i[2]], rtol=1e-12)
        np.testing.assert_allclose(t_new, [t_i[:2].mean(), t_i[2]], rtol=1e-12)
    assert aff["scale"] is None and aff["bias"] is None
    with pytest.raises(ValueError, match="unknown BatchNorm merge rule 'median'"):
        merge.merge_batchnorm(mean, var, scale, bias, labels, eps, rule="median")


@pytest.mark.slow
def test_densenet_seed_parameter_counts_of_the_study():
    config = ModelConfig("densenet_seed")
    model = build_model(config)
    shapes = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes)
    assert count_params(variables) == 995_230
    gray = fold.fold_to_gray(model, variables, "sum", input_shape=config.input_shape)
    shape = (1, 32, 32, 1)
    one = merge.merge_layer(model, gray, 1, np.arange(36) % 21, input_shape=shape)
    assert count_params(one) == 964_237
    two = merge.merge_layers(
        model, gray, {1: np.arange(36) % 20, 2: np.arange(18) % 12}, input_shape=shape
    )
    assert count_params(two) == 950_046
    widths = graph.widths_of(model, two, shape)
    assert widths["stem"] == 20 and widths["block1/layer1/conv"] == 12
    rebuilt = ModelConfig("densenet_seed", in_channels=1, widths=widths)
    assert count_params(jax.eval_shape(lambda: init_variables(rebuilt, jax.random.key(0)))) == (
        950_046
    )


def test_bad_input_names_the_path():
    model, variables, shape = project_model("densenet_test")
    with pytest.raises(ValueError, match=r"'stem' must have shape \(8,\)"):
        merge.merge_layer(model, variables, 1, np.zeros(7, int), input_shape=shape)
    with pytest.raises(ValueError, match=r"'stem' must use every cluster 0..3; missing \[1, 2\]"):
        merge.merge_layer(model, variables, 1, [0, 0, 3, 3, 0, 0, 0, 0], input_shape=shape)
    with pytest.raises(ValueError, match="layer 99 does not exist"):
        merge.merge_layer(model, variables, 99, np.arange(8), input_shape=shape)
    with pytest.raises(ValueError, match="'head/conv' has no traced consumers"):
        merge.merge_layer(model, variables, "head/conv", np.arange(10), input_shape=shape)
    nan = jax.tree.map(np.array, variables)
    nan["params"]["block1"]["layer1"]["conv"]["kernel"][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="params/block1/layer1/conv/kernel holds NaN"):
        merge.merge_layer(model, nan, 1, np.arange(8), input_shape=shape)
    _, other, _ = project_model("resnet_test")
    with pytest.raises(ValueError, match="tree does not match the model"):
        merge.merge_layer(model, other, 1, np.arange(8), input_shape=shape)
    wrong = jax.tree.map(np.array, variables)
    wrong["params"]["block1"]["layer2"]["conv"]["kernel"] = np.zeros((3, 3, 5, 4), np.float32)
    with pytest.raises(ValueError, match=r"block1/layer2/conv/kernel is \(3, 3, 5, 4\)"):
        merge.merge_layer(model, wrong, 1, np.arange(8), input_shape=shape)


@pytest.mark.parametrize(
    "name, layer", [("densenet_test", 1), ("vgg", 2), ("resnet_test", 1), ("residual", "res2")]
)
def test_pruning_filters_nobody_reads_keeps_logits(name, layer):
    """Pruning drops the filters and their consumer slices: when every consumer's slice
    of the dropped filters is zero, the network computes the same logits."""
    model, variables, shape = any_model(name)
    g = graph.trace(model, variables, shape)
    path = layer if isinstance(layer, str) else g.convs[layer - 1]
    width = g.widths[path]
    keep = np.arange(0, width, 2)  # drop every other filter
    flat = {p: np.array(v) for p, v in flatten(variables).items()}
    members = set(g.group(path))
    for use in g.uses_of(path):
        if use.kind != "contract":
            continue
        leaf, pos = np.moveaxis(flat[use.leaf], use.axis, 0), 0
        for seg in use.segments:
            if seg.source in members:
                dropped = np.setdiff1d(np.arange(width), keep)
                leaf[pos + dropped] = 0.0
            pos += seg.length
    silenced = jax.tree.map(np.asarray, unflatten(flat))
    x = images(shape)
    plan = merge.plan_prune(g, layer, keep)
    assert plan.prune and plan.num_clusters == len(keep) and "(keep)" in plan.describe()
    pruned = plan.apply(silenced)
    after = logits(graph.rebuild(model, pruned, shape), pruned, x)
    np.testing.assert_allclose(after, logits(model, silenced, x), atol=ATOL, rtol=0)
    kernel = flatten(pruned)[f"params/{path}/kernel"]
    np.testing.assert_array_equal(kernel, flatten(silenced)[f"params/{path}/kernel"][..., keep])


def test_l1_keep_is_the_largest_kernel_norms():
    model, variables, shape = any_model("densenet_test")
    g = graph.trace(model, variables, shape)
    kernel = np.asarray(flatten(variables)["params/stem/kernel"])  # (3, 3, 3, F)
    norms = np.abs(kernel).sum(axis=(0, 1, 2))
    keep = controls.l1_keep(g, variables, "stem", 3)
    np.testing.assert_array_equal(keep, np.sort(np.argsort(norms)[::-1][:3]))
    with pytest.raises(ValueError, match="cannot keep 0 of the 8 filters"):
        controls.l1_keep(g, variables, "stem", 0)
    with pytest.raises(ValueError, match="distinct filter indices"):
        merge.plan_prune(g, 1, [0, 0])
