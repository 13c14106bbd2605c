"""The stages of compress, as functions of plain data: no files, figures or JSON here.

    color model -> fold to gray -> per layer: compare filters (fields or responses)
    -> distances -> clusters -> merge (and the controls at the same widths)
    -> recovery (compensation, BN re-estimation, fine-tuning) -> evaluation

Each stage takes and returns `Model`s, arrays and small result types, so a new stage is
one function here and one line in `pipeline.compress`. `graycnn.study.writer` owns
every file. The first stages (the data, the color model and the checks before any long
work) are in `graycnn.study.inputs`, and importable from here.
"""

import dataclasses
import functools
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from graycnn import cluster, distance, fold
from graycnn import compensate as compensation
from graycnn import graph as graph_lib
from graycnn import merge as merge_lib
from graycnn import receptive_field as rf
from graycnn.graph import capture
from graycnn.layers import layer_output_fn, resolve_layer
from graycnn.models import ModelConfig, build_model, count_params, init_variables
from graycnn.study import controls
from graycnn.study.config import ACTIVATION, FISHER, ON_IMAGES, CompressConfig
from graycnn.study.inputs import (
    PRETRAINED,
    SEARCH_BN_BATCH,
    Model,
    Splits,
    check_data,
    check_layers,
    color_model,
    load_splits,
    plan_steps,
    read_splits,
)
from graycnn.training import bn_reestimate, data, evaluation
from graycnn.training import train as train_lib

# The stages of `graycnn.study.inputs` included.
__all__ = [
    "PRETRAINED",
    "SEARCH_BN_BATCH",
    "Evaluation",
    "LayerResult",
    "Model",
    "Splits",
    "apply_plan",
    "check_data",
    "check_layers",
    "color_model",
    "control_plan",
    "evaluate_model",
    "filter_responses",
    "finetune",
    "fold_color_model",
    "load_splits",
    "merge_and_compensate",
    "merge_costs",
    "plan_layer_merge",
    "plan_steps",
    "read_splits",
    "reestimate_bn",
    "refit_unmerged",
    "size",
    "train_scratch",
]


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """What merging one layer found and made.

    Attributes:
        layer, path: The conv's number and module path.
        objective, metric: What was compared, and how.
        fields: The merged model's receptive fields of the layer (F, H, W, 1).
        color_fields: The color model's fields of the same layer (F, H, W, 3), or None
            where they were not computed (`plan_layer_merge`'s figures).
        distances: (F, F) between the filters.
        clustering: The clusters.
        plan: The merge to apply (`merge_and_compensate` applies it).
    """

    layer: int
    path: str
    objective: str
    metric: str
    fields: rf.ReceptiveFields
    color_fields: np.ndarray | None
    distances: np.ndarray
    clustering: cluster.Clustering
    plan: merge_lib.MergePlan


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Per-image correctness (bool, split order) on validation and held-out data."""

    validation: np.ndarray
    held_out: np.ndarray | None


def fold_color_model(config: CompressConfig, color: Model, train: data.Split) -> Model:
    """The color model with its first conv folded to one gray channel (`config.fold`)."""
    fit = fold.fit_gray_coefficients(train.images) if config.fold == "fit" else None
    variables = fold.fold_to_gray(
        build_model(color.config),
        color.variables,
        config.fold,
        fit=fit,
        input_shape=color.config.input_shape,
    )
    return Model(color.config.replace(in_channels=1), variables)


def plan_layer_merge(
    config: CompressConfig,
    model: Model,
    layer: int,
    count: int | None,
    train: data.Split,
    color: Model,
    seed: int,
    figures: bool = True,
) -> LayerResult:
    """Fields (or responses) -> distances -> clusters (to `count`, or by DBSCAN's eps
    rule if None) -> merge, for one layer.

    Args:
        figures: Also compute what only the figures show (the color model's fields,
            when they are not what is compared); else `color_fields` is None.
    """
    net = build_model(model.config)
    path = resolve_layer(layer, model.graph().conv_order)
    objective = config.objective_of(layer)
    ascent: dict[str, Any] = dict(
        objective="center" if objective in ON_IMAGES else objective, steps=config.steps, seed=seed
    )
    fields = rf.gradient_ascent(
        net, model.variables, layer, image_shape=model.config.input_shape[1:], **ascent
    )
    color_fields: np.ndarray | None = None
    if figures or (config.fields == "color_luma" and objective not in ON_IMAGES):
        color_fields = rf.gradient_ascent(
            build_model(color.config),
            color.variables,
            layer,
            image_shape=color.config.input_shape[1:],
            **ascent,
        ).fields
    if objective == FISHER:
        distances = merge_costs(net, model.variables, path, train, seed)
    else:
        if objective == ACTIVATION:
            compared = filter_responses(net, model.variables, path, train, seed)
        elif config.fields == "color_luma":
            # Not None: computed above for color_luma.
            compared = np.asarray(rf.to_gray(typing.cast(np.ndarray, color_fields)))[..., 0]
        else:
            compared = fields.fields[..., 0]
        distances = np.asarray(distance.pairwise(compared, config.metric_of(layer)))
    if count is not None:
        clustering = cluster.cluster(distances, config.cluster, num_clusters=count)
    else:
        clustering = cluster.cluster(distances, "dbscan", eps_std=config.eps_std)
    plan = merge_lib.plan_merge(model.graph(), layer, clustering.labels, config.bn_rule)
    metric = FISHER if objective == FISHER else config.metric_of(layer)
    return LayerResult(
        layer, path, objective, metric, fields, color_fields, distances, clustering, plan
    )


def merge_and_compensate(
    config: CompressConfig,
    before: Model,
    plan: merge_lib.MergePlan,
    train: data.Split,
    seed: int,
    color: Model,
) -> tuple[Model, list[dict[str, Any]]]:
    """`plan` applied to `before`, then every consumer of the merged channels refit on
    --compensate_images seeded gray training images: to its output in `before`
    ('lstsq'), or in the color model on the same images in color ('lstsq_color').

    Returns:
        (the merged model, one reconstruction-error entry per consumer; [] for 'none').
    """
    if config.compensation == "none":
        return apply_plan(before, plan), []
    idx = np.random.default_rng(seed).permutation(len(train))[: config.compensate_images]
    teacher = None
    if config.compensation == "lstsq_color":
        color_images = np.asarray(data.apply_view(train.images[idx], "color"))
        teacher = compensation.Teacher(build_model(color.config), color.variables, color_images)
    variables, report = compensation.compensate_merge(
        build_model(before.config),
        before.variables,
        plan,
        np.asarray(data.apply_view(train.images[idx], "gray")),
        input_shape=before.config.input_shape,
        teacher=teacher,
    )
    widths = graph_lib.widths_of(build_model(before.config), variables, before.config.input_shape)
    return Model(before.config.replace(widths=widths), variables), report


def refit_unmerged(
    config: CompressConfig,
    gray: Model,
    steps: list[tuple[int, int | None]],
    train: data.Split,
    seed: int,
    color: Model,
) -> Model:
    """`gray` with the consumers of each of `steps`' layers refit as
    `merge_and_compensate` refits a merge's, but nothing merged (every filter its own
    cluster): the reference that tells what the refit buys without a merge."""
    model = gray
    for layer, _ in steps:
        g = model.graph()
        width = g.widths[resolve_layer(layer, g.conv_order)]
        identity = merge_lib.plan_merge(g, layer, np.arange(width), config.bn_rule)
        model, _ = merge_and_compensate(config, model, identity, train, seed, color)
    return model


def apply_plan(model: Model, plan: merge_lib.MergePlan) -> Model:
    """The model with a merge or prune plan applied, its config narrowed to match."""
    variables = plan.apply(model.variables)
    widths = graph_lib.widths_of(build_model(model.config), variables, model.config.input_shape)
    return Model(model.config.replace(widths=widths), variables)


def control_plan(
    config: CompressConfig, kind: str, model: Model, layer: int, labels, seed: int
) -> merge_lib.MergePlan:
    """A control at the widths of a merge with `labels`: 'random' (a random partition
    with the same cluster sizes) or 'prune_l1' (keep the largest-L1 filters)."""
    g = model.graph()
    if kind == "random":
        return merge_lib.plan_merge(g, layer, controls.random_labels(labels, seed), config.bn_rule)
    path = resolve_layer(layer, g.conv_order)
    keep = controls.l1_keep(g, model.variables, path, int(np.max(labels)) + 1)
    return merge_lib.plan_prune(g, layer, keep)


def filter_responses(
    model: Any, variables: Any, path: str, split: data.Split, seed: int, count: int = 256
) -> np.ndarray:
    """Each filter's output on `count` seeded training images, gray view.

    Returns:
        (F, count, H', W') float32: one stack of response maps per filter.
    """
    out = _layer_output(model, path)(variables, _response_images(split, seed, count))
    return np.moveaxis(np.asarray(out), -1, 0)


def _response_images(split: data.Split, seed: int, count: int) -> np.ndarray:
    """The `count` seeded training images, gray view, that responses are taken on."""
    idx = np.random.default_rng(seed).permutation(len(split))[:count]
    return np.asarray(data.apply_view(split.images[idx], "gray"))


def merge_costs(
    model: Any, variables: Any, path: str, split: data.Split, seed: int, count: int = 256
) -> np.ndarray:
    """`distance.pairwise_merge_cost` of conv `path`'s channels on the images
    `filter_responses` sees: each response normalized by its channel's mean and std over
    them, the derivatives those of the logits whitened by the softmax's Fisher
    information, u = sqrt(p) (logits - p . logits) at p fixed, so that |du|^2 / 2 is the
    KL divergence of a small change.

    Returns:
        (F, F) float64 distances.
    """
    images = _response_images(split, seed, count)
    z = np.asarray(_layer_output(model, path)(variables, images))  # (B, H, W, F)
    std = z.std(axis=(0, 1, 2))
    std = np.where(std > 0, std, 1.0)  # a dead channel: n = 0, nothing to scale
    n = (z - z.mean(axis=(0, 1, 2))) / std
    jacobian = _whitened_jacobian(model, path)
    g = np.concatenate(
        [
            np.asarray(jacobian(variables, images[i : i + _JACOBIAN_BATCH]))
            for i in range(0, len(images), _JACOBIAN_BATCH)
        ]
    )
    g = g * std  # d/dn = std d/dz, as z = mean + std n
    b, c, f = len(g), g.shape[1], z.shape[-1]
    return distance.pairwise_merge_cost(n.reshape(b, -1, f), g.reshape(b, c, -1, f))


# Images per vmapped Jacobian: classes x images x the layer's output, in float32.
_JACOBIAN_BATCH = 32


@functools.lru_cache(maxsize=64)
def _whitened_jacobian(model: Any, path: str):
    """Jitted f(variables, images) -> (B, C, H, W, F) derivatives of the whitened logits
    u (`merge_costs`) in the output of module `path`."""
    forward = capture.perturbed_fn(model, path)
    output = layer_output_fn(model, path)

    def jacobian(variables, images):
        # Only its shape is used: XLA drops the computation.
        delta = jnp.zeros_like(output(variables, images))

        def whitened(d):
            logits = forward(variables, images, d)
            p = jax.lax.stop_gradient(jax.nn.softmax(logits))
            centered = logits - jnp.sum(p * logits, axis=-1, keepdims=True)
            return jnp.sqrt(p) * centered

        u, pullback = jax.vjp(whitened, delta)
        basis = jnp.broadcast_to(
            jnp.eye(u.shape[-1], dtype=u.dtype)[:, None], (u.shape[-1], *u.shape)
        )
        (g,) = jax.vmap(pullback)(basis)  # (C, B, H, W, F)
        return jnp.moveaxis(g, 0, 1)

    return jax.jit(jacobian)


@functools.lru_cache(maxsize=64)
def _layer_output(model: Any, path: str):
    """Jitted `layer_output_fn`, cached per (architecture, layer): a fresh jit of a fresh
    closure traces and compiles again for every seed, control chain and budget option."""
    return jax.jit(layer_output_fn(model, path))


def reestimate_bn(
    config: CompressConfig, model: Model, color: Model, workdir: str, seed: int
) -> Model:
    """BatchNorm re-estimated on gray training images by `config.bn` (BN training at
    `config.bn_lr`), the same budget for every row (`workdir` holds BN training
    checkpoints; a rerun reuses them); with `config.bn_loss='kd'`, BN training distills
    `color`."""
    variables = bn_reestimate.reestimate(
        config.bn,
        model.config,
        model.variables,
        dataset=config.dataset,
        view="gray",
        workdir=workdir,
        seed=seed,
        epochs=config.bn_epochs,
        learning_rate=config.bn_lr,
        data_dir=config.data_dir,
        teacher=_teacher(color, config.bn_loss),
    )
    return dataclasses.replace(model, variables=jax.device_get(variables))


def finetune(config: CompressConfig, model: Model, color: Model, workdir: str, seed: int) -> Model:
    """All weights trained `config.finetune_epochs` epochs on gray images, by distilling
    the color model ('kd') or on the labels ('ce'); the same for every row."""
    train_config = train_lib.TrainConfig(
        model=model.config.name,
        dataset=config.dataset,
        view="gray",
        epochs=config.finetune_epochs,
        batch_size=train_lib.stage_batch_size(),
        learning_rate=config.finetune_lr,
        momentum=0.9,
        distill=config.finetune,
        seed=seed,
        data_dir=config.data_dir,
    )
    _, variables, _ = train_lib.train_and_evaluate(
        train_config,
        workdir,
        init=(model.config, dict(model.variables)),
        teacher=_teacher(color, config.finetune),
    )
    return dataclasses.replace(model, variables=variables)


def train_scratch(config: CompressConfig, model: Model, workdir: str, seed: int) -> Model:
    """The scratch control: `model`'s exact architecture and widths, initialized afresh
    and trained `config.scratch_epochs` epochs on gray training images with the color
    model's training recipe (`TrainConfig`'s defaults: what experiments.train ran)."""
    train_config = train_lib.TrainConfig(
        model=model.config.name,
        dataset=config.dataset,
        view="gray",
        epochs=config.scratch_epochs,
        seed=seed,
        validate=False,  # the report evaluates it; no choice is made on its epochs
        data_dir=config.data_dir,
    )
    fresh = init_variables(model.config, jax.random.key(seed))
    _, variables, _ = train_lib.train_and_evaluate(
        train_config, workdir, init=(model.config, fresh)
    )
    return dataclasses.replace(model, variables=jax.device_get(variables))


def _teacher(color: Model, loss: str) -> tuple[ModelConfig, Any] | None:
    """What train.train_and_evaluate distills for `loss` ('kd': the color model)."""
    return (color.config, color.variables) if loss == "kd" else None


def evaluate_model(model: Model, view: str, splits: Splits) -> Evaluation:
    """Per-image correctness of `model` on the validation and held-out images."""

    def correct(split):
        return evaluation.evaluate(model.config, model.variables, split, view)["correct"]

    held_out = correct(splits.held_out) if splits.held_out is not None else None
    return Evaluation(correct(splits.validation), held_out)


def size(model: Model) -> dict[str, int]:
    """{'params', 'flops'} of the model (FLOPs of one image)."""
    return {"params": count_params(model.variables), "flops": model.graph().flops()["total"]}
