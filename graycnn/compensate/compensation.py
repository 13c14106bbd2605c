"""Data-aware compensation of a merge: refit each consumer to its original outputs.

A merge replaces a cluster's filters by their mean and sums the cluster's input slices
in every consumer (a conv or dense layer reading the merged channels, `MergePlan.
consumers`). That is exact for identical filters only. `compensate` then refits each
consumer on real images so that its output stays what it was in the unmerged model
(He et al. 2017, "Channel pruning"; Luo et al. 2017, ThiNet):

    W' = W_merged + dW,  dW = argmin ||P dW - (y - P W_merged)||^2 + lam ||dW||^2,

with P the im2col patches of the consumer's input in the merged model (a dense
layer's input is its own patch; a ones column carries the bias), y the consumer's
pre-activation output in the original model on the same images, and lam = ridge *
trace(P^T P) / D for D patch features (ridge 1e-3 by default: 1e-3 of the Gram's mean
eigenvalue). The ridge bounds the condition number of the solved system by 1 + D /
ridge and damps directions the images barely excite (a dead channel is a zero Gram
row); directions with eigenvalue well above lam are fit unshrunk. Fitting the change
rather than the kernel keeps a merge of identical filters exact: the residual is 0, so
dW = 0.

Order: consumers and the BatchNorms that normalize merged channels are processed in
the order the forward pass calls them, each on the model as already updated upstream
(sequential, as ThiNet): a consumer sees the inputs the compensated layers before it
produce, and a BatchNorm's statistics describe the channels that will really reach it.

BatchNorm statistics of the merged channels (`bn`):
    'relative' (default): the merge's statistics (see `merge.merge_batchnorm`) are
        corrected by what the images show, mean + (m - m_pred) and std * s / s_pred,
        where m, s are the merged channel's mean and std (sqrt(var + eps)) on the images
        and m_pred, s_pred the 'moments' rule applied to the members' mean and std on
        the same images in the original model. Identical members give m = m_pred,
        s = s_pred: the merge stays exact. Dissimilar members partly cancel, and s <
        s_pred says by how much.
    'exact': the merged channels' exact mean and variance on the images (inference
        mode), as a recalibration on these images would set them; not exact for
        identical members, since the original statistics came from other images.
    'none': keep the merge's statistics.
Only the merged channels' entries change: a BatchNorm's other channels come from
compensated layers, which reproduce the outputs their statistics describe.

Memory: images go through in batches (`batch_size`, or as many as `memory_budget`
bytes of patches allow); P^T P and P^T R are summed per batch in float32 under jit and
across batches in float64 on the host, where the system is solved. The report gives
each system's condition number; on the shipped densenet_tiny's stem consumers (D = 324
to 648, condition 7e4 to 1.3e5) the float32 sums give a dW within 1e-4 to 2e-4
(relative) of float64 sums. A stride-1 conv's sums skip the patches
(`layer.normal_equations`).
Errors after the fit come from a forward pass of the compensated model, not from the
normal equations, so an inaccurate Gram would show there.

Teacher: with `teacher` (a model with the same consumers, its variables and its own
row-matched images), y is the teacher's output instead of the original model's: e.g.
the color model on the color images whose gray view the merged model sees, so each
consumer is fit to what the color network computed, not only to what the unmerged
gray network did (`--compensate=lstsq_color`). Nothing else changes: the BatchNorm
statistics are still re-estimated against the original model. A merge of identical
filters is then no longer exact (the fit also absorbs the fold's loss).

Not refit: a merged conv that does not read the merged channels (a residual group's
conv2) keeps its averaged filters; a member that also reads them (a 1x1 conv added to
its own input) is a consumer, fit to its original outputs averaged per cluster.

Example:
    >>> plan = merge.plan_merge(graph.trace(model, gray, shape), 1, labels)
    >>> images = data.apply_view(train.images[:512], "gray")
    >>> new, report = compensate_merge(model, gray, plan, images, input_shape=shape)
    >>> [(r["consumer"], r["error_before"], r["error_after"]) for r in report]
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np
from flax import nnx

from graycnn import graph, nnx_adapter
from graycnn.compensate.layer import (
    kernel_from_matrix,
    kernel_matrix,
    output_map,
    ridge_solve,
)
from graycnn.compensate.passes import (
    Fit,
    Passes,
    Teacher,
    bytes_per_image,
    mean_var,
    probe,
)
from graycnn.graph import like_leaf, module_of
from graycnn.merge import MergePlan
from graycnn.tree import flatten, unflatten

BN_MODES = ("relative", "exact", "none")


@dataclasses.dataclass(frozen=True)
class BatchNormSite:
    """Where merged channels sit in a BatchNorm's input.

    Attributes:
        path: The nn.BatchNorm module path.
        original: (P,) positions, in the original model's BN input, of the merged convs'
            channels.
        labels: (P,) for each, the index into `merged` of the channel it became
            (-1: pruned away).
        merged: (Q,) positions of the merged channels in the merged model's BN input.
    """

    path: str
    original: np.ndarray
    labels: np.ndarray
    merged: np.ndarray


def batchnorm_sites(plan: MergePlan) -> list[BatchNormSite]:
    """The BatchNorms a merge plan changes, and where the merged channels sit in them."""
    members, width = set(plan.group), plan.num_clusters
    sites = []
    for step in plan.steps:
        if step.how != "batchnorm":
            continue
        original: list[Any] = []
        labels: list[Any] = []
        merged: list[Any] = []
        old = new = 0
        for seg in step.segments:
            if seg.source in members:
                original.extend(range(old, old + seg.length))
                offset = len(merged)
                labels.extend(np.where(plan.labels < 0, -1, plan.labels + offset).tolist())
                merged.extend(range(new, new + width))
                new += width
            else:
                new += seg.length
            old += seg.length
        sites.append(
            BatchNormSite(
                module_of(step.leaves[0][1]), *map(np.asarray, (original, labels, merged))
            )
        )
    return sites


def compensate_merge(
    model: nn.Module,
    original_variables: Mapping[str, Any],
    plan: MergePlan,
    images: Any,
    *,
    input_shape: Sequence[int],
    **options: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`plan.apply(original_variables)`, then `compensate` of every consumer of the plan.

    A consumer that is also a merged conv (it reads and feeds a residual group) is fit
    to its original outputs merged per cluster (`output_map`). Options: `compensate`'s.
    An nnx.Module takes an nnx.State or None, and gets back what `compensate` returns.
    """
    model, original_variables, back = nnx_adapter.adapt(model, original_variables)
    merged = plan.apply(original_variables)
    targets = {c: output_map(plan.labels) for c in plan.consumers if c in plan.group}
    new, report = compensate(
        model,
        original_variables,
        merged,
        plan.consumers,
        images,
        input_shape=input_shape,
        targets=targets,
        batchnorms=batchnorm_sites(plan),
        **options,
    )
    return back(new), report


def compensate(
    model: nn.Module,
    original_variables: Mapping[str, Any],
    merged_variables: Mapping[str, Any],
    consumers: Sequence[str],
    images: Any,
    *,
    input_shape: Sequence[int],
    targets: Mapping[str, np.ndarray] | None = None,
    batchnorms: Sequence[BatchNormSite] = (),
    bn: str = "relative",
    ridge: float = 1e-3,
    batch_size: int | None = None,
    memory_budget: int = 512 * 2**20,
    holdout: Any = None,
    teacher: Teacher | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Refits each consumer of a merge to its outputs in the original model (or the
    teacher's).

    Args:
        model: The architecture (original or merged: widths are read off each tree),
            linen or NNX.
        original_variables: The unmerged tree; not modified. For an nnx.Module an
            nnx.State or None (the module's own).
        merged_variables: The merged tree (or nnx.State); not modified.
        consumers: Module paths of the flax nn.Conv / nn.Dense layers to refit (none:
            only the BatchNorm statistics are re-estimated).
        images: (N, H, W, C) what the model takes (e.g. `data.apply_view(x, "gray")`),
            a few hundred training images without augmentation.
        input_shape: (1, H, W, C) of the model's input.
        targets: consumer -> (K, F) map of its F original output channels to its K
            merged ones, for consumers whose own filters were merged (`output_map`).
        batchnorms: Where merged channels sit in BatchNorms (`batchnorm_sites`).
        bn: 'relative', 'exact' or 'none': how those statistics are re-estimated first
            (module docstring).
        ridge: lam = ridge * trace(P^T P) / D.
        batch_size: Images per batch; None: as many as `memory_budget` bytes of patches,
            residuals and the consumer's activations allow.
        holdout: (N', H, W, C) other images the errors are also measured on (not with
            a teacher).
        teacher: Fit each consumer to this model's outputs on its images (row-matched
            to `images`) instead of the original model's; errors are then measured
            against the teacher too.

    Returns:
        (new tree, report): the tree as `original_variables` came (for an nnx.Module
        a new nnx.State, or a new nnx.Module for None); one report entry per consumer,
        in forward order: {'consumer',
        'images', 'rows' (patches M), 'features' (D, bias column included), 'lam',
        'condition' (of P^T P + lam I), 'error_before', 'error_after'} and, with
        `holdout`, 'holdout_images', 'holdout_before', 'holdout_after'. An error is
        sum (out - y)^2 / sum (y - mean(y))^2 over rows and output channels (1 - R^2;
        means per channel; nan for a constant y), out the consumer's output with its
        merged (before) or refit (after) kernel, on the inputs the compensated model
        gives it: 'before' already profits from the BatchNorms and the consumers
        upstream.

    Raises:
        ValueError: unknown `bn`, negative ridge, images of the wrong shape, a consumer
            that is not an nn.Conv / nn.Dense or is called twice, output widths that
            differ without a target map, a teacher whose images or consumers do not
            match; naming the path.
    """
    if bn not in BN_MODES:
        raise ValueError(f"unknown BatchNorm mode {bn!r}; modes: {BN_MODES}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    input_shape = tuple(int(s) for s in input_shape)
    model, original_variables, back = nnx_adapter.adapt(model, original_variables)
    if isinstance(merged_variables, nnx.State):
        merged_variables = nnx_adapter.to_variables(merged_variables)
    images = _check_images(images, input_shape, "images")
    holdout = None if holdout is None else _check_images(holdout, input_shape, "holdout")
    original = graph.rebuild(model, original_variables, input_shape)
    merged = graph.rebuild(model, merged_variables, input_shape)
    graph.check_variables(original, original_variables, input_shape)
    graph.check_variables(merged, merged_variables, input_shape)
    sites = {} if bn == "none" else {s.path: s for s in batchnorms}
    consumers = list(dict.fromkeys(consumers))
    if teacher is not None:
        teacher, shapes_t = _check_teacher(teacher, images, holdout, consumers)
    paths = consumers + [p for p in sites if p not in consumers]
    one = (1, *input_shape[1:])
    info_o, shapes_o = probe(original, original_variables, one, paths)
    info_m, shapes_m = probe(merged, merged_variables, one, paths)
    targets = {c: np.asarray(t, np.float64) for c, t in (targets or {}).items()}
    for c in consumers:
        if isinstance(info_m[c], float):
            raise ValueError(f"consumer {c!r} is a BatchNorm, not a conv or dense layer")
        want = (shapes_m[c][1].shape[-1], shapes_o[c][1].shape[-1])
        got = targets[c].shape if c in targets else (want[1], want[1])
        if got != want:
            raise ValueError(
                f"consumer {c!r} has {want[1]} outputs in the original model and {want[0]} "
                f"merged: it needs a target map of shape {want}, got {got}"
            )
        if teacher is not None and shapes_t[c][1].shape[-1] != want[1]:
            raise ValueError(
                f"consumer {c!r} has {shapes_t[c][1].shape[-1]} outputs in the teacher and "
                f"{want[1]} in the original model"
            )
    per_image = {c: bytes_per_image(info_m[c], *shapes_m[c]) for c in consumers}
    if batch_size is None:
        batch_size = max(1, min(len(images), memory_budget // max(per_image.values(), default=1)))
    passes = Passes(original, merged, original_variables, batch_size, teacher)
    flat = {p: np.array(v) for p, v in flatten(merged_variables).items()}
    fits = {}
    for path in shapes_m:  # the forward order
        passes.use(unflatten(flat))
        if path in sites:
            _reestimate(passes, flat, sites[path], info_m[path], images, bn)
        elif path in consumers:
            fits[path] = _refit(passes, flat, path, info_m[path], targets.get(path), images, ridge)
    report = [{"consumer": p, "images": len(images), **fit.summary} for p, fit in fits.items()]
    # One pass measures every consumer, so its batches hold every consumer's patches.
    largest, total = max(per_image.values(), default=1), max(sum(per_image.values()), 1)
    together = max(1, batch_size * largest // total)
    passes.use(unflatten(flat))
    sets = {"error": images} | ({} if holdout is None else {"holdout": holdout})
    for name, x in sets.items():
        errors = passes.errors(fits, x, together) if fits else {}
        for entry in report:
            entry[f"{name}_before"], entry[f"{name}_after"] = errors[entry["consumer"]]
            if name == "holdout":
                entry["holdout_images"] = len(x)
    return back(unflatten(flat)), report


def _refit(passes, flat, path, spec, target, images, ridge) -> Fit:
    """Fits consumer `path` (writing its new kernel and bias into `flat`)."""
    kernel_leaf, bias_leaf = f"params/{path}/kernel", f"params/{path}/bias"
    kernel = np.asarray(flat[kernel_leaf], np.float64)
    bias = np.asarray(flat[bias_leaf], np.float64) if spec.use_bias else np.zeros(kernel.shape[-1])
    fit = Fit(spec, kernel_matrix(kernel), bias, np.zeros_like(bias), target)
    stats = passes.accumulate(passes.gram_fn(path, fit), images, *fit.args())
    delta, lam = ridge_solve(stats["gram"], stats["cross"], ridge)
    eig = np.linalg.eigvalsh(stats["gram"])
    d = fit.kernel.shape[0]
    flat[kernel_leaf] = like_leaf(
        flat[kernel_leaf], kernel_from_matrix(fit.kernel + delta[:d], kernel.shape)
    )
    if spec.use_bias:
        flat[bias_leaf] = like_leaf(flat[bias_leaf], bias + delta[d])
    fit.shift = stats["sum"] / stats["rows"]  # the output's mean: centers later sums
    fit.summary = {
        "rows": int(stats["rows"]),
        "features": int(delta.shape[0]),
        "lam": lam,
        "condition": float((eig[-1] + lam) / max(eig[0] + lam, np.finfo(float).tiny)),
    }
    return fit


def _reestimate(passes, flat, site, epsilon, images, mode) -> None:
    """Re-estimates the merged channels' statistics of BatchNorm `site` in `flat`."""
    mean_leaf, var_leaf = f"batch_stats/{site.path}/mean", f"batch_stats/{site.path}/var"
    if mean_leaf not in flat or var_leaf not in flat:
        raise ValueError(f"BatchNorm {site.path!r} has no running mean and var in the tree")
    shift_o = np.asarray(flatten(passes.original_variables)[mean_leaf], np.float32)
    shift_m = np.asarray(flat[mean_leaf], np.float32)
    orig, cur = passes.accumulate(passes.batchnorm_fn(site.path), images, shift_o, shift_m)
    mean_o, var_o = mean_var(orig, shift_o)
    mean_c, var_c = mean_var(cur, shift_m)
    mean = np.asarray(flat[mean_leaf], np.float64)
    var = np.asarray(flat[var_leaf], np.float64)
    q = site.merged
    if mode == "exact":
        new_mean, new_var = mean_c[q], var_c[q]
    else:
        keep = site.labels >= 0
        avg = output_map(site.labels[keep])
        pred_mean = avg @ mean_o[site.original[keep]]
        pred_std = avg @ np.sqrt(var_o[site.original[keep]] + epsilon)
        std = np.sqrt(var_c[q] + epsilon)
        ratio = np.divide(std, pred_std, out=np.ones_like(std), where=pred_std > 0)
        new_mean = mean[q] + mean_c[q] - pred_mean
        new_var = np.maximum((np.sqrt(var[q] + epsilon) * ratio) ** 2 - epsilon, 0.0)
    mean[q], var[q] = new_mean, new_var
    flat[mean_leaf] = like_leaf(flat[mean_leaf], mean)
    flat[var_leaf] = like_leaf(flat[var_leaf], var)


def _check_teacher(teacher: Teacher, images, holdout, consumers) -> tuple[Teacher, dict]:
    """(the teacher with its images as an array, {consumer: its (input, output) shapes
    in the teacher}), checked against the fit's images."""
    if holdout is not None:
        raise ValueError("holdout errors are measured against the original model: no teacher")
    x = np.asarray(teacher.images)
    if x.ndim != images.ndim or len(x) != len(images) or x.shape[1:3] != images.shape[1:3]:
        raise ValueError(
            f"teacher images must be row-matched to the images {images.shape}: the same "
            f"count and size; got shape {x.shape}"
        )
    shape = (1, *x.shape[1:])
    model, variables, _ = nnx_adapter.adapt(teacher.model, teacher.variables)
    model = graph.rebuild(model, variables, shape)
    _, shapes = probe(model, variables, shape, consumers)
    return dataclasses.replace(teacher, model=model, variables=variables, images=x), shapes


def _check_images(images: Any, input_shape: tuple[int, ...], name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != len(input_shape) or images.shape[1:] != input_shape[1:] or not len(images):
        raise ValueError(
            f"{name} must be (N, {', '.join(map(str, input_shape[1:]))}) with N >= 1, as "
            f"the model takes them; got shape {images.shape}"
        )
    return images
