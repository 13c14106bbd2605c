"""Tests for graycnn.compensate: the im2col ordering, the ridge solve, exactness for
identical filters, and that a real merge's consumers are refit closer to the original,
on tiny models with random weights and real (gray) CIFAR-10 images."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_merge_helpers import VGG, Residual, he_normal, logits, perturb, tie_clusters

from graycnn import compensate, fold, graph, merge
from graycnn.layers import layer_output_fn
from graycnn.models import ModelConfig, build_model, init_variables
from graycnn.training import data
from graycnn.tree import flatten, unflatten

# (model, layer): a DenseNet stem read by every layer of its block and the transition;
# a ResNet residual group (stem + conv2) read by convs and a projection shortcut; a conv
# read by a dense layer through a flatten; a group whose member res3 also reads it.
# The tiny vgg and residual models keep each test in the fast tier; the project's test
# models (a few seconds each to trace and refit) are in the slow one.
CASES = [
    pytest.param("densenet_test", 1, marks=pytest.mark.slow),
    pytest.param("resnet_test", 1, marks=pytest.mark.slow),
    ("vgg", "conv2"),
    ("residual", "res2"),
]


@functools.cache
def _model(name: str):
    """(module, perturbed random variables, gray input shape): He-normal kernels."""
    if name in ("vgg", "residual"):
        module, shape = {"vgg": VGG(), "residual": Residual()}[name], (1, 16, 16, 1)
        shapes = jax.eval_shape(module.init, jax.random.key(0), jax.numpy.zeros(shape))
    else:
        config = ModelConfig(name, in_channels=1)
        module, shape = build_model(config), config.input_shape
        shapes = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    return module, perturb(he_normal(shapes)), shape


@functools.cache
def _images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, holdout): 64 real training images each, gray, center-cropped to `size`."""
    x = data.load_dataset("cifar10_sample", "train").images[:128]
    lo = (32 - size) // 2
    x = np.asarray(data.apply_view(x[:, lo : lo + size, lo : lo + size], "gray"))
    return x[:64], x[64:]


def _labels(width: int) -> np.ndarray:
    """Clusters {0, 2, 5} (or {0, 2} for fewer than 6 filters), {1, 3}, singletons."""
    labels = np.arange(width)
    labels[[2, 5] if width >= 6 else [2]], labels[3] = 0, 1
    return np.unique(labels, return_inverse=True)[1]


def _setup(name, layer):
    model, variables, shape = _model(name)
    g = graph.trace(model, variables, shape)
    path = layer if isinstance(layer, str) else g.conv_order[layer - 1]
    return model, variables, shape, g, path


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (1, 1))])
@pytest.mark.parametrize("strides", [1, 2])
def test_patches_times_kernel_matrix_is_the_conv(padding, strides):
    x = np.random.default_rng(0).normal(size=(2, 7, 6, 3)).astype(np.float32)
    for conv in (
        nn.Conv(4, (3, 2), strides=strides, padding=padding),
        nn.Conv(5, (3, 3), strides=strides, padding=padding, kernel_dilation=2, use_bias=False),
    ):
        variables = conv.init(jax.random.key(1), x)
        out = np.asarray(conv.apply(variables, x))
        kernel = np.asarray(variables["params"]["kernel"])
        bias = np.asarray(variables["params"].get("bias", 0.0))
        p = np.asarray(compensate.patches(x, compensate.layer_spec(conv)))
        assert p.shape == (out.size // out.shape[-1], kernel[..., 0].size)
        got = p.astype(np.float64) @ compensate.kernel_matrix(kernel) + bias
        np.testing.assert_allclose(got, out.reshape(-1, out.shape[-1]), atol=1e-5, rtol=0)
        back = compensate.kernel_from_matrix(compensate.kernel_matrix(kernel), kernel.shape)
        np.testing.assert_array_equal(back, kernel)


def test_dense_patches_are_its_input():
    x = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    dense = nn.Dense(4)
    variables = dense.init(jax.random.key(1), x)
    spec = compensate.layer_spec(dense)
    p = np.asarray(compensate.patches(x, spec))
    k, b = (np.asarray(variables["params"][n]) for n in ("kernel", "bias"))
    out = np.asarray(dense.apply(variables, x)).reshape(-1, 4)
    np.testing.assert_allclose(p @ compensate.kernel_matrix(k) + b, out, atol=1e-5)
    assert spec.use_bias and spec.kind == "dense"


def _im2col(x, window, strides, padding, dilation):
    """float64 patches by loops: rows (n, i, j), features (c, dy, dx), explicit padding."""
    (kh, kw), (sh, sw), (dh, dw) = window, strides, dilation
    extent = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    if padding in ("SAME", "VALID"):
        pads = []
        for size, e, s in zip(x.shape[1:3], extent, strides, strict=True):
            total = max((-(-size // s) - 1) * s + e - size, 0) if padding == "SAME" else 0
            pads.append((total // 2, total - total // 2))
    else:
        pads = padding
    xp = np.pad(x.astype(np.float64), ((0, 0), *pads, (0, 0)))
    rows_out = (xp.shape[1] - extent[0]) // sh + 1
    cols_out = (xp.shape[2] - extent[1]) // sw + 1
    out = [
        [
            xp[n, sh * i + dh * dy, sw * j + dw * dx, c]
            for c in range(x.shape[-1])
            for dy in range(kh)
            for dx in range(kw)
        ]
        for n in range(x.shape[0])
        for i in range(rows_out)
        for j in range(cols_out)
    ]
    return np.asarray(out)


@pytest.mark.parametrize(
    "shape, window, strides, padding, dilation",
    [
        ((2, 7, 6, 3), (3, 3), (1, 1), "SAME", (1, 1)),  # the stride-1 sums without P
        ((2, 8, 9, 2), (3, 2), (1, 2), "VALID", (1, 1)),
        ((2, 9, 9, 2), (3, 3), (1, 1), ((1, 2), (0, 1)), (2, 3)),
        ((2, 3, 4, 2), (5, 3), (1, 1), "SAME", (1, 1)),  # fewer output rows than the window
        ((2, 7, 6, 3), (3, 3), (2, 1), "SAME", (1, 1)),  # row stride 2: through P
        ((2, 5, 6, 3), (1, 3), (1, 1), "SAME", (1, 1)),  # one window row: through P
    ],
)
def test_normal_equations_are_the_patches_products(shape, window, strides, padding, dilation):
    """P^T P, P^T R, P^T 1 and P K against loops over the padded input in float64."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    spec = compensate.LayerSpec("conv", window, strides, padding, (1, 1), dilation)
    p = _im2col(x, window, strides, padding, dilation)
    residual = rng.normal(size=(p.shape[0], 4)).astype(np.float32)
    kernel = rng.normal(size=(p.shape[1], 5)).astype(np.float32)
    gram, cross, ones = compensate.normal_equations(x, residual, spec)
    for got, want in ((gram, p.T @ p), (cross, p.T @ residual), (ones, p.sum(0))):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    out = compensate.apply_matrix(x, kernel, spec)
    np.testing.assert_allclose(out, p @ kernel, rtol=0, atol=1e-5 * np.abs(p @ kernel).max())


def test_ridge_solve_matches_lstsq_of_the_design_matrix():
    rng = np.random.default_rng(0)
    p, r = rng.normal(size=(40, 6)), rng.normal(size=(40, 3))
    p[:, 5] = p[:, 4] + 1e-3 * rng.normal(size=40)  # nearly collinear: the ridge matters
    x, lam = compensate.ridge_solve(p.T @ p, p.T @ r, 0.05)
    assert lam == pytest.approx(0.05 * np.sum(p**2) / 6)
    design = np.concatenate([p, np.sqrt(lam) * np.eye(6)])
    expected = np.linalg.lstsq(design, np.concatenate([r, np.zeros((6, 3))]), rcond=None)[0]
    np.testing.assert_allclose(x, expected, rtol=1e-9, atol=1e-12)
    x0, lam0 = compensate.ridge_solve(p.T @ p, p.T @ r, 0.0)
    assert lam0 == 0.0
    np.testing.assert_allclose(x0, np.linalg.lstsq(p, r, rcond=None)[0], rtol=1e-6)


@pytest.mark.parametrize("name, layer", CASES)
def test_identical_filters_stay_exact(name, layer):
    model, variables, shape, g, path = _setup(name, layer)
    labels = _labels(g.widths[path])
    tied = tie_clusters(g, variables, path, labels)
    plan = merge.plan_merge(g, path, labels)
    merged = plan.apply(tied)
    fit, holdout = _images(shape[1])
    new, report = compensate.compensate_merge(
        model, tied, plan, fit, input_shape=shape, holdout=holdout
    )
    order = [r["consumer"] for r in report]  # forward order: convs as numbered, then dense
    assert sorted(order) == sorted(plan.consumers)
    convs = [c for c in order if c in g.conv_order]
    assert convs == sorted(convs, key=g.conv_order.index) and order[: len(convs)] == convs
    for r in report:
        for key in ("error_before", "error_after", "holdout_before", "holdout_after"):
            assert r[key] < 1e-8, (r["consumer"], key, r[key])  # (1e-4 rms)^2
    for leaf, value in flatten(merged).items():  # dW = 0, BN statistics kept
        scale = max(1.0, float(np.max(np.abs(value))))
        np.testing.assert_allclose(flatten(new)[leaf], value, atol=1e-5 * scale, err_msg=leaf)
    rebuilt = graph.rebuild(model, new, shape)
    np.testing.assert_allclose(
        logits(rebuilt, new, holdout), logits(model, tied, holdout), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    "name, layer", [*CASES, pytest.param("densenet_test", "prune", marks=pytest.mark.slow)]
)
def test_real_merge_is_refit_closer_to_the_original(name, layer):
    model, variables, shape, g, path = _setup(name, 1 if layer == "prune" else layer)
    width = g.widths[path]
    if layer == "prune":
        plan = merge.plan_prune(g, path, np.arange(0, width, 2))
    else:
        plan = merge.plan_merge(g, path, _labels(width))
    merged = plan.apply(variables)
    before = {k: np.array(v) for k, v in flatten(variables).items()}
    fit, holdout = _images(shape[1])
    new, report = compensate.compensate_merge(
        model, variables, plan, fit, input_shape=shape, holdout=holdout
    )
    for key, leaf in flatten(variables).items():  # pure: the input is not modified
        np.testing.assert_array_equal(leaf, before[key])
    assert len(report) == len(plan.consumers)
    for r in report:
        assert r["error_after"] < r["error_before"], r
        assert r["holdout_after"] < r["holdout_before"], r
    rebuilt = graph.rebuild(model, merged, shape)
    reference = logits(model, variables, holdout)
    gap_merged = np.mean((logits(rebuilt, merged, holdout) - reference) ** 2)
    gap_compensated = np.mean((logits(rebuilt, new, holdout) - reference) ** 2)
    assert gap_compensated < 0.5 * gap_merged, (gap_compensated, gap_merged)


@pytest.mark.parametrize("mode", ["exact", "relative"])
def test_batchnorm_statistics_of_the_merged_channels(mode):
    """The DenseNet stem feeds block1's BNs directly (its channels first in each
    concatenation), so their statistics are the stem output's on the images."""
    model, variables, shape, g, path = _setup("densenet_test", 1)
    labels = _labels(g.widths[path])
    plan = merge.plan_merge(g, path, labels)
    merged = plan.apply(variables)
    fit, _ = _images(32)
    new, report = compensate.compensate(
        model, variables, merged, (), fit, input_shape=shape,
        batchnorms=compensate.batchnorm_sites(plan), bn=mode,
    )  # fmt: skip
    assert report == []
    rebuilt = graph.rebuild(model, merged, shape)
    z = np.asarray(jax.jit(layer_output_fn(rebuilt, path))(merged, fit), np.float64)
    x = np.asarray(jax.jit(layer_output_fn(model, path))(variables, fit), np.float64)
    m_z, v_z = z.mean((0, 1, 2)), z.var((0, 1, 2))
    m_x, s_x = x.mean((0, 1, 2)), np.sqrt(x.var((0, 1, 2)) + 1e-3)
    k = labels.max() + 1
    avg = (labels[None] == np.arange(k)[:, None]) / np.bincount(labels)[:, None]
    for bn in ("block1/layer1/bn", "block1/layer2/bn", "transition1/bn"):
        mean, var = (flatten(merged)[f"batch_stats/{bn}/{s}"][:k] for s in ("mean", "var"))
        if mode == "exact":
            expected_mean, expected_var = m_z, v_z
        else:
            expected_mean = mean + m_z - avg @ m_x
            std = np.sqrt(var + 1e-3) * np.sqrt(v_z + 1e-3) / (avg @ s_x)
            expected_var = std**2 - 1e-3
        got = flatten(new)
        np.testing.assert_allclose(got[f"batch_stats/{bn}/mean"][:k], expected_mean, atol=2e-4)
        np.testing.assert_allclose(got[f"batch_stats/{bn}/var"][:k], expected_var, rtol=2e-4)
        rest = flatten(merged)[f"batch_stats/{bn}/mean"][k:]  # other channels kept
        np.testing.assert_array_equal(got[f"batch_stats/{bn}/mean"][k:], rest)


@pytest.mark.slow
def test_a_teacher_consumer_is_what_the_refit_recovers():
    """No merge, one consumer whose kernel the teacher changed: a refit to the teacher's
    outputs reproduces the teacher's (its input is the same in both), where a refit to
    the original's keeps the kernel."""
    model, variables, shape, g, _ = _setup("densenet_test", 1)
    consumer = "block1/layer1/conv"
    leaf = f"params/{consumer}/kernel"
    flat = flatten(variables)
    kernel = np.asarray(flat[leaf])
    target = kernel + 0.1 * np.random.default_rng(3).normal(size=kernel.shape)
    teacher_vars = unflatten(flat | {leaf: target.astype(np.float32)})
    fit, _ = _images(32)
    teacher = compensate.Teacher(model, teacher_vars, fit)
    new, report = compensate.compensate(
        model, variables, variables, [consumer], fit, input_shape=shape, ridge=1e-8,
        teacher=teacher,
    )  # fmt: skip
    out = jax.jit(layer_output_fn(model, consumer))
    np.testing.assert_allclose(out(new, fit), out(teacher_vars, fit), atol=1e-2)
    assert report[0]["error_before"] > 1e-2 and report[0]["error_after"] < 1e-5, report
    # Without the teacher, the same call fits the original: nothing to change.
    same, _ = compensate.compensate(
        model, variables, variables, [consumer], fit, input_shape=shape, ridge=1e-8
    )
    np.testing.assert_allclose(flatten(same)[leaf], kernel, atol=1e-5)


@pytest.mark.slow
def test_a_color_teacher_through_an_exact_fold_keeps_identical_filters_exact():
    """The teacher reads 3 channels (color model, gray3 images); the `sum` fold of it on
    the luma images computes the same, so a tie merge refit to the teacher stays exact."""
    config = ModelConfig("densenet_test")
    color = build_model(config)
    shapes = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    color_vars = perturb(he_normal(shapes))
    gray_vars = fold.fold_to_gray(color, color_vars, "sum", input_shape=config.input_shape)
    gray_model, shape = build_model(config.replace(in_channels=1)), (1, 32, 32, 1)
    g = graph.trace(gray_model, gray_vars, shape)
    path = g.conv_order[0]
    labels = _labels(g.widths[path])
    tied_gray = tie_clusters(g, gray_vars, path, labels)
    # The same tie in the color model: its stem's filters repeat as the gray stem's do.
    tied_color = _spread_over_rgb(tied_gray, path)
    fit, _ = _images(32)
    teacher = compensate.Teacher(color, tied_color, np.repeat(fit, 3, axis=-1))
    plan = merge.plan_merge(g, path, labels)
    new, report = compensate.compensate_merge(
        gray_model, tied_gray, plan, fit, input_shape=shape, teacher=teacher
    )
    assert len(report) == len(plan.consumers)
    for r in report:
        assert r["error_before"] < 1e-8 and r["error_after"] < 1e-8, r
    rebuilt = graph.rebuild(gray_model, new, shape)
    np.testing.assert_allclose(
        logits(rebuilt, new, fit), logits(gray_model, tied_gray, fit), atol=1e-4, rtol=0
    )


def _spread_over_rgb(gray_vars, path):
    """A color tree whose `sum` fold is `gray_vars`: the stem kernel / 3 on each of RGB."""
    flat = flatten(gray_vars)
    kernel = np.asarray(flat[f"params/{path}/kernel"])
    flat[f"params/{path}/kernel"] = np.repeat(kernel, 3, axis=-2) / 3
    return unflatten(flat)


def test_bad_input_names_what_is_wrong():
    model, variables, shape, g, path = _setup("densenet_test", 1)
    plan = merge.plan_merge(g, path, _labels(g.widths[path]))
    merged = plan.apply(variables)
    fit, _ = _images(32)
    with pytest.raises(ValueError, match="unknown BatchNorm mode 'adam'"):
        compensate.compensate(model, variables, merged, [], fit, input_shape=shape, bn="adam")
    with pytest.raises(ValueError, match=r"images must be \(N, 32, 32, 1\)"):
        compensate.compensate(model, variables, merged, [], fit[..., :16, :], input_shape=shape)
    with pytest.raises(ValueError, match="'block1/layer1/bn' is a BatchNorm"):
        compensate.compensate(
            model, variables, merged, ["block1/layer1/bn"], fit, input_shape=shape
        )
    with pytest.raises(ValueError, match=r"\['nope'\] are not called"):
        compensate.compensate(model, variables, merged, ["nope"], fit, input_shape=shape)
    with pytest.raises(ValueError, match="teacher images must be row-matched"):
        compensate.compensate(
            model, variables, merged, [], fit, input_shape=shape,
            teacher=compensate.Teacher(model, variables, fit[:10]),
        )  # fmt: skip
    with pytest.raises(ValueError, match="holdout errors .* no teacher"):
        compensate.compensate(
            model, variables, merged, [], fit, input_shape=shape, holdout=fit,
            teacher=compensate.Teacher(model, variables, fit),
        )  # fmt: skip
