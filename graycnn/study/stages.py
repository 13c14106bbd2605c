"""The stages of compress, as functions of plain data: no files, figures or JSON here.

    color model -> fold to gray -> per layer: compare filters (fields or responses)
    -> distances -> clusters -> merge (and the controls at the same widths)
    -> recovery (compensation, BN re-estimation, fine-tuning) -> evaluation

Each stage takes and returns `Model`s, arrays and small result types, so a new stage is
one function here and one line in `pipeline.compress`. `graycnn.study.writer` owns
every file.
"""

import dataclasses
import functools
import hashlib
import importlib.resources
import typing
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from graycnn import cluster, distance, fold
from graycnn import compensate as compensation
from graycnn import graph as graph_lib
from graycnn import merge as merge_lib
from graycnn import receptive_field as rf
from graycnn.layers import layer_output_fn, resolve_layer
from graycnn.models import ModelConfig, build_model, count_params, init_variables
from graycnn.study import controls
from graycnn.study.config import ACTIVATION, CompressConfig, validate
from graycnn.training import bn_reestimate, checkpoint, data, evaluation
from graycnn.training import train as train_lib

# Made by `python -m experiments.train --epochs=40 --seed=0 --workdir=DIR` (docs/results.md).
PRETRAINED = {"densenet_tiny": "densenet_tiny_color"}
# The BN recalibration batch of the --target_* search's sensitivity measure (budget).
SEARCH_BN_BATCH = 64


@dataclasses.dataclass(frozen=True)
class Model:
    """A model of the run: its config and variables (host arrays).

    Attributes:
        source: The checkpoint directory it was read from, if any.
    """

    config: ModelConfig
    variables: Mapping[str, Any]
    source: str | None = None

    def graph(self) -> graph_lib.ChannelGraph:
        """The model's channel graph (traced once per architecture, then cached)."""
        return graph_lib.trace(build_model(self.config), self.variables, self.config.input_shape)

    def widths(self) -> dict[int, int]:
        """{conv layer number: filters}."""
        g = self.graph()
        return {i: g.widths.get(p, 0) for i, p in enumerate(g.conv_order, start=1)}


@dataclasses.dataclass(frozen=True)
class Splits:
    """train fits weights; validation is where rows are compared; held_out (optional)
    is reported and never chosen on."""

    train: data.Split
    validation: data.Split
    held_out: data.Split | None = None
    held_out_name: str | None = None


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """What merging one layer found and made.

    Attributes:
        layer, path: The conv's number and module path.
        objective, metric: What was compared, and how.
        fields: The merged model's receptive fields of the layer (F, H, W, 1).
        color_fields: The color model's fields of the same layer (F, H, W, 3), or None
            where they were not computed (`merge_layer`'s figures).
        distances: (F, F) between the filters.
        clustering: The clusters.
        plan: The merge to apply (`compensate` applies it).
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


def load_splits(config: CompressConfig, color: Model, splits: Splits | None = None) -> Splits:
    """The run's data (`splits`, else `read_splits`), checked against the color model's
    input and classes before any work."""
    splits = read_splits(config) if splits is None else splits
    check = lambda split: evaluation.check_input(color.config, split, "color")  # noqa: E731
    held_out = None if splits.held_out is None else check(splits.held_out)
    return Splits(check(splits.train), check(splits.validation), held_out, splits.held_out_name)


def read_splits(config: CompressConfig) -> Splits:
    """The run's data as stored; the held-out set is all of --eval_dataset, or the
    dataset's own test split for --eval_dataset=test (absent if it has none)."""
    train = data.load_dataset(config.dataset, "train", config.data_dir)
    validation = data.load_dataset(config.dataset, "validation", config.data_dir)
    name: str | None = config.eval_dataset
    held_out: data.Split | None = None
    if name == "test":
        name = f"{config.dataset}:test"
        try:
            held_out = data.load_dataset(config.dataset, "test", config.data_dir)
        except ValueError:
            name = None  # The dataset has no test split; --eval_dataset names one.
    elif name != "none":
        held_out = data.load_dataset(config.eval_dataset, "all", config.data_dir)
    else:
        name = None
    return Splits(train, validation, held_out, name)


def check_data(config: CompressConfig, splits: Splits) -> None:
    """Checks, before any work, that the data can do what every stage asks of it: the
    held-out images are none of the images choices are made on (train and validation),
    the validation and held-out splits hold images, and the training split holds a batch
    for every training stage, whose steps fit the int32 step counter.

    Raises:
        ValueError: naming the flags (--dataset, --eval_dataset, the stage's flag).
    """
    if splits.held_out is not None:
        seen = set(_image_hashes(splits.train)) | set(_image_hashes(splits.validation))
        shared = sum(h in seen for h in _image_hashes(splits.held_out))
        if shared:
            raise ValueError(
                f"--eval_dataset={config.eval_dataset}: {shared} of its {len(splits.held_out)} "
                f"images are also in the train or validation split of "
                f"--dataset={config.dataset}; held-out images must be ones no choice was "
                "made on"
            )
        if not len(splits.held_out):
            raise ValueError(f"--eval_dataset={config.eval_dataset} holds no images")
    if not len(splits.validation):
        raise ValueError(
            f"--dataset={config.dataset}: its validation split holds no images (too few "
            "per class), and every row is compared on it"
        )
    n = len(splits.train)
    batch = train_lib.stage_batch_size()
    # (what trains, its epochs flag or None, the batch it needs)
    needs: list[tuple[str, str | None, int]] = []
    if _trains_color(config):
        needs.append((f"training --model={config.model}", "--train_epochs", batch))
    if config.bn == "train":
        needs.append(("--bn=train", "--bn_epochs", batch))
    elif config.bn == "recalibrate":
        needs.append(("--bn=recalibrate", None, bn_reestimate.RECALIBRATE_BATCH))
    if config.finetune_epochs:
        needs.append(("--finetune_epochs", "--finetune_epochs", batch))
    if config.target:
        needs.append(("the --target_flops/--target_params search", None, SEARCH_BN_BATCH))
    for what, flag, need in needs:
        if n < need:
            raise ValueError(
                f"--dataset={config.dataset}: its train split holds {n} images, fewer than "
                f"the batch of {need} that {what} needs"
            )
        if flag is not None:
            train_lib.check_epochs(getattr(config, flag[2:]), n // need, flag)


def _image_hashes(split: data.Split) -> list[bytes]:
    """One digest per image (its shape and bytes): 5,000 CIFAR images take milliseconds."""
    return [
        hashlib.blake2b(str(image.shape).encode() + image.tobytes(), digest_size=16).digest()
        for image in np.ascontiguousarray(split.images)
    ]


def _trains_color(config: CompressConfig) -> bool:
    """Whether `color_model` trains the color model (no checkpoint given or shipped)."""
    return config.checkpoint is None and not (
        config.model in PRETRAINED and config.dataset == "cifar10_sample"
    )


def check_layers(config: CompressConfig, splits: Splits) -> None:
    """--layers and --num_clusters against the architecture before a color model is
    trained for minutes: its shapes alone, from the same ModelConfig training makes. (A
    checkpoint's or the shipped model, read in seconds, is checked by `plan_steps`.)

    Raises:
        ValueError: naming the flag, as `plan_steps` does.
    """
    if not _trains_color(config) or config.target:
        return
    model_config = ModelConfig(
        config.model,
        in_channels=3,
        num_classes=splits.train.num_classes,
        image_size=splits.train.images.shape[1],
        class_names=splits.train.class_names or (),
    )
    shapes = jax.eval_shape(lambda: init_variables(model_config, jax.random.key(0)))
    plan_steps(config, Model(model_config, shapes))


def color_model(config: CompressConfig, train_workdir: str, model_given: bool = False) -> Model:
    """The color model to compress: the checkpoint, the shipped pretrained model, or one
    trained in `train_workdir` (a rerun resumes it).

    Args:
        model_given: --model was set explicitly: with --checkpoint, they must agree.
    """
    if config.checkpoint is not None:
        path = config.checkpoint
    elif not _trains_color(config):
        path = str(importlib.resources.files("graycnn") / "assets" / PRETRAINED[config.model])
    else:
        train_config = train_lib.TrainConfig(
            model=config.model,
            dataset=config.dataset,
            epochs=config.train_epochs,
            batch_size=train_lib.stage_batch_size(),
            seed=config.seed,
            data_dir=config.data_dir,
        )
        model_config, variables, _ = train_lib.train_and_evaluate(train_config, train_workdir)
        return Model(model_config, variables, train_workdir)
    model_config, variables, _ = checkpoint.load_model(path)
    if model_given and config.checkpoint is not None and model_config.name != config.model:
        raise ValueError(
            f"--model={config.model} disagrees with --checkpoint={path}, which holds a "
            f"{model_config.name}: drop --model, or pass its checkpoint"
        )
    if model_config.in_channels != 3:
        raise ValueError(f"{path}: the model to compress must take color (3-channel) input")
    return Model(model_config, variables, path)


def fold_to_gray(config: CompressConfig, color: Model, train: data.Split) -> Model:
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


def merge_layer(
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
        objective="center" if objective == ACTIVATION else objective, steps=config.steps, seed=seed
    )
    fields = rf.gradient_ascent(
        net, model.variables, layer, input_shape=model.config.input_shape[1:], **ascent
    )
    color_fields: np.ndarray | None = None
    if figures or (config.fields == "color_luma" and objective != ACTIVATION):
        color_fields = rf.gradient_ascent(
            build_model(color.config),
            color.variables,
            layer,
            input_shape=color.config.input_shape[1:],
            **ascent,
        ).fields
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
    return LayerResult(
        layer, path, objective, config.metric_of(layer), fields, color_fields, distances,
        clustering, plan,
    )  # fmt: skip


def plan_steps(
    config: CompressConfig, gray: Model, chosen: list[tuple[int, int]] | None = None
) -> list[tuple[int, int | None]]:
    """[(layer, cluster count, or None for DBSCAN's eps rule)] in merge order: the
    `chosen` steps of a budget search, else --layers and --num_clusters, checked
    against the model before any long work."""
    if chosen is None:
        validate(config, gray.widths())
        chosen = [(layer, config.num_clusters.of(layer)) for layer in config.layers]
    g = gray.graph()
    for layer, _ in chosen:
        g.check_mergeable(resolve_layer(layer, g.conv_order))
    return [(int(layer), count) for layer, count in chosen]


def compensate(
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
    if config.compensate == "none":
        return apply_plan(before, plan), []
    idx = np.random.default_rng(seed).permutation(len(train))[: config.compensate_images]
    teacher = None
    if config.compensate == "lstsq_color":
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
    """`gray` with the consumers of each of `steps`' layers refit as `compensate` refits
    a merge's, but nothing merged (every filter its own cluster): the reference that
    tells what the refit buys without a merge."""
    model = gray
    for layer, _ in steps:
        g = model.graph()
        width = g.widths[resolve_layer(layer, g.conv_order)]
        identity = merge_lib.plan_merge(g, layer, np.arange(width), config.bn_rule)
        model, _ = compensate(config, model, identity, train, seed, color)
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
    idx = np.random.default_rng(seed).permutation(len(split))[:count]
    images = data.apply_view(split.images[idx], "gray")
    out = _layer_output(model, path)(variables, images)
    return np.moveaxis(np.asarray(out), -1, 0)


@functools.lru_cache(maxsize=64)
def _layer_output(model: Any, path: str):
    """Jitted `layer_output_fn`, cached per (architecture, layer): a fresh jit of a fresh
    closure traces and compiles again for every seed, control chain and budget option."""
    return jax.jit(layer_output_fn(model, path))


def reestimate_bn(
    config: CompressConfig, model: Model, color: Model, workdir: str, seed: int
) -> Model:
    """BatchNorm re-estimated on gray training images by `config.bn`, the same budget
    for every row (`workdir` holds BN training checkpoints; a rerun reuses them);
    with `config.bn_loss='kd'`, BN training distills `color`."""
    variables = bn_reestimate.reestimate(
        config.bn,
        model.config,
        model.variables,
        dataset=config.dataset,
        view="gray",
        workdir=workdir,
        seed=seed,
        epochs=config.bn_epochs,
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


def _teacher(color: Model, loss: str) -> tuple[ModelConfig, Any] | None:
    """What train.train_and_evaluate distills for `loss` ('kd': the color model)."""
    return (color.config, color.variables) if loss == "kd" else None


def evaluate(model: Model, view: str, splits: Splits) -> Evaluation:
    """Per-image correctness of `model` on the validation and held-out images."""

    def correct(split):
        return evaluation.evaluate(model.config, model.variables, split, view)["correct"]

    held_out = correct(splits.held_out) if splits.held_out is not None else None
    return Evaluation(correct(splits.validation), held_out)


def size(model: Model) -> dict[str, int]:
    """{'params', 'flops'} of the model (FLOPs of one image)."""
    return {"params": count_params(model.variables), "flops": model.graph().flops()["total"]}
