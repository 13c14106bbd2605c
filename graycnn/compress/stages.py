"""The stages of compress, as functions of plain data: no files, figures or JSON here.

    color model -> fold to gray -> per layer: compare filters (fields or responses)
    -> distances -> clusters -> merge -> BN re-estimation -> evaluation

Each stage takes and returns `Model`s, arrays and small result types, so a new stage (a
control, a compensation step, a fine-tune) is one function here and one line in
`pipeline.compress`. `graycnn.compress.writer` owns every file.
"""

import dataclasses
import importlib.resources
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from graycnn import batchnorm, checkpoint, cluster, data, distance, evaluation, fold, graph
from graycnn import merge as merge_lib
from graycnn import receptive_field as rf
from graycnn import train as train_lib
from graycnn.compress.config import ACTIVATION, CompressConfig
from graycnn.layers import layer_output_fn, resolve_layer
from graycnn.models import ModelConfig, build_model, count_params

# Made by `python -m experiments.train --epochs=40 --seed=0 --workdir=DIR` (docs/results.md).
PRETRAINED = {"densenet_tiny": "densenet_tiny_color"}


@dataclasses.dataclass(frozen=True)
class Model:
    """A model of the run: its config and variables (host arrays).

    Attributes:
        source: The checkpoint directory it was read from, if any.
    """

    config: ModelConfig
    variables: Mapping[str, Any]
    source: str | None = None

    def graph(self) -> graph.ChannelGraph:
        """The model's channel graph (traced once per architecture, then cached)."""
        return graph.trace(build_model(self.config), self.variables, self.config.input_shape)


@dataclasses.dataclass(frozen=True)
class Splits:
    train: data.Split
    validation: data.Split


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """What merging one layer found and made.

    Attributes:
        layer, path: The conv's number and module path.
        objective, metric: What was compared, and how.
        fields: The merged model's receptive fields of the layer (F, H, W, 1).
        color_fields: The color model's fields of the same layer (F, H, W, 3), shown
            beside their luma (the study's Figures 6-7).
        distances: (F, F) between the filters.
        clustering: The clusters.
        plan: The merge as applied.
        merged: The merged model.
    """

    layer: int
    path: str
    objective: str
    metric: str
    fields: rf.ReceptiveFields
    color_fields: np.ndarray
    distances: np.ndarray
    clustering: cluster.Clustering
    plan: merge_lib.MergePlan
    merged: Model


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One row of the report: one model evaluated on the validation split.

    Attributes:
        correct: (N,) bool per validation image, in split order (for paired statistics;
            not written to report.json).
    """

    name: str
    key: str
    image_type: str
    accuracy: float
    params: int
    flops: int
    clusters: Mapping[int, int]
    bn: str
    correct: np.ndarray
    baseline: bool = False

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "image_type": self.image_type,
            "accuracy": self.accuracy,
            "params": self.params,
            "flops": self.flops,
            "clusters": {str(k): v for k, v in self.clusters.items()},
            "bn": self.bn,
        }
        return out | ({"baseline": True} if self.baseline else {})


def load_splits(config: CompressConfig) -> Splits:
    return Splits(
        data.load_dataset(config.dataset, "train", config.data_dir),
        data.load_dataset(config.dataset, "validation", config.data_dir),
    )


def color_model(config: CompressConfig, train_workdir: str) -> Model:
    """The color model to compress: the checkpoint, the shipped pretrained model, or one
    trained in `train_workdir` (a rerun resumes it)."""
    if config.checkpoint is not None:
        path = config.checkpoint
    elif config.model in PRETRAINED and config.dataset == "cifar10_sample":
        path = str(importlib.resources.files("graycnn") / "assets" / PRETRAINED[config.model])
    else:
        train_config = train_lib.TrainConfig(
            model=config.model,
            dataset=config.dataset,
            epochs=config.train_epochs,
            seed=config.seed,
            data_dir=config.data_dir,
        )
        model_config, variables, _ = train_lib.train_and_evaluate(train_config, train_workdir)
        return Model(model_config, variables, train_workdir)
    model_config, variables, _ = checkpoint.load_model(path)
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
    config: CompressConfig, model: Model, layer: int, train: data.Split, color: Model
) -> LayerResult:
    """Fields (or responses) -> distances -> clusters -> merge, for one layer."""
    net = build_model(model.config)
    path = resolve_layer(layer, model.graph().conv_order)
    objective = config.objective_of(layer)
    ascent = dict(
        objective="center" if objective == ACTIVATION else objective,
        steps=config.steps,
        seed=config.seed,
    )
    fields = rf.gradient_ascent(
        net, model.variables, layer, input_shape=model.config.input_shape[1:], **ascent
    )
    color_fields = rf.gradient_ascent(
        build_model(color.config),
        color.variables,
        layer,
        input_shape=color.config.input_shape[1:],
        **ascent,
    ).fields
    compared = fields.fields[..., 0]
    if objective == ACTIVATION:
        compared = filter_responses(net, model.variables, path, train, config.seed)
    distances = np.asarray(distance.pairwise(compared, config.metric_of(layer)))
    clustering = cluster_filters(config, layer, distances)
    plan = merge_lib.plan_merge(model.graph(), layer, clustering.labels)
    merged = plan.apply(model.variables)
    widths = graph.widths_of(net, merged, model.config.input_shape)
    return LayerResult(
        layer,
        path,
        objective,
        config.metric_of(layer),
        fields,
        color_fields,
        distances,
        clustering,
        plan,
        Model(model.config.replace(widths=widths), merged),
    )


def filter_responses(
    model: Any, variables: Any, path: str, split: data.Split, seed: int, count: int = 256
) -> np.ndarray:
    """Each filter's output on `count` seeded training images, gray view.

    Returns:
        (F, count, H', W') float32: one stack of response maps per filter.
    """
    idx = np.random.default_rng(seed).permutation(len(split))[:count]
    images = data.apply_view(split.images[idx], "gray")
    out = jax.jit(layer_output_fn(model, path))(variables, images)
    return np.moveaxis(np.asarray(out), -1, 0)


def cluster_filters(
    config: CompressConfig, layer: int, distances: np.ndarray
) -> cluster.Clustering:
    """A target count uses --cluster; without one, the study's rule: DBSCAN, eps_std."""
    target = config.num_clusters.of(layer)
    if target is not None:
        return cluster.cluster(distances, config.cluster, num_clusters=target)
    return cluster.cluster(distances, "dbscan", eps_std=config.eps_std)


def reestimate_bn(config: CompressConfig, model: Model, workdir: str) -> Model:
    """BatchNorm re-estimated on gray training images by `config.bn`, with the same
    budget for every row (`workdir` holds BN training checkpoints; a rerun reuses them)."""
    variables = batchnorm.reestimate(
        config.bn,
        model.config,
        model.variables,
        dataset=config.dataset,
        view="gray",
        workdir=workdir,
        seed=config.seed,
        epochs=config.bn_epochs,
        data_dir=config.data_dir,
    )
    return dataclasses.replace(model, variables=jax.device_get(variables))


def evaluate(
    name: str,
    key: str,
    view: str,
    model: Model,
    split: data.Split,
    *,
    clusters: Mapping[int, int] | None = None,
    bn: str = "-",
    baseline: bool = False,
) -> Row:
    """The report row of `model` on `split` seen as `view`."""
    result = evaluation.evaluate(model.config, model.variables, split, view)
    return Row(
        name=name,
        key=key,
        image_type=view,
        accuracy=result["accuracy"],
        params=count_params(model.variables),
        flops=model.graph().flops()["total"],
        clusters=dict(clusters or {}),
        bn=bn,
        correct=result["correct"],
        baseline=baseline,
    )
