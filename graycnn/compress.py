"""The whole study in one call: fold a color model to gray, then for each layer compute
receptive fields, distances and clusters, merge, re-estimate BatchNorm and evaluate.

Every row of the report is a model saved under `workdir/models/`, loadable by
`experiments.evaluate` with no further flags. The input checkpoint is only read.
"""

import dataclasses
import importlib.resources
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from graycnn import batchnorm, checkpoint, cluster, data, distance, io, merge, report, train
from graycnn import receptive_field as rf
from graycnn.figures import clusters as cluster_figures
from graycnn.figures import receptive_fields as rf_figures
from graycnn.figures import report as report_figures
from graycnn.layers import conv_layers, layer_output_fn, resolve_layer
from graycnn.models import ModelConfig, build_model

FOLD_METHODS = ("sum", "luma", "mean", "fit")
CLUSTER_METHODS = ("dbscan", "complete")
# Besides the receptive-field objectives: cluster each filter's responses to real images.
ACTIVATION = "activation"
OBJECTIVES = (*rf.OBJECTIVES, ACTIVATION)
# Made by `python -m experiments.train --epochs=40 --seed=0 --workdir=DIR` (BUILD_NOTES.md).
PRETRAINED = {"densenet_tiny": "densenet_tiny_color"}


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """One compress run. Per-layer settings map a layer number to a value.

    Attributes:
        checkpoint: The color model; None uses the shipped pretrained `model`, or trains
            one (cached in the workdir) if none is shipped.
        layers: Conv layers to merge, in order (numbers as experiments.summary shows).
        objective: Receptive-field objective per layer ('mean', 'center', 'kernel').
        metric: Distance per layer ('mse', 'ssim', 'imed').
        num_clusters: Target clusters per layer, reached by `cluster_method`; layers
            absent use DBSCAN with `eps_std` (the study's rule).
        eps_std: DBSCAN eps as this many standard deviations of the distances (the study).
        bn: BatchNorm re-estimation for every gray row: 'train', 'recalibrate' or 'none'.
    """

    checkpoint: str | None = None
    model: str = "densenet_tiny"
    dataset: str = "cifar10_sample"
    train_epochs: int = 40
    layers: tuple[int, ...] = (1, 2)
    fold: str = "sum"
    objective: Mapping[int, str] = dataclasses.field(default_factory=dict)
    default_objective: str = "mean"
    steps: int = 100
    metric: Mapping[int, str] = dataclasses.field(default_factory=dict)
    cluster_method: str = "dbscan"
    num_clusters: Mapping[int, int] = dataclasses.field(default_factory=dict)
    eps_std: float = 0.2
    bn: str = "train"
    bn_epochs: int = 1
    seed: int = 0
    data_dir: str | None = None

    def objective_of(self, layer: int) -> str:
        return self.objective.get(layer, self.default_objective)

    def metric_of(self, layer: int) -> str:
        # The study: MSE for layer 1 (brightness), IMED for later (patterns).
        return self.metric.get(layer, "mse" if layer == 1 else "imed")


def validate(config: CompressConfig, num_layers: int | None = None) -> None:
    """Raises ValueError naming the flag at fault; layer ranges only if num_layers is given."""
    if len(set(config.layers)) != len(config.layers):
        raise ValueError(f"--layers lists a layer twice: {list(config.layers)}")
    per_layer = {
        "--layers": config.layers,
        "--objective": config.objective,
        "--metric": config.metric,
        "--num_clusters": config.num_clusters,
    }
    for flag, keys in per_layer.items():
        for layer in keys:
            if layer < 1 or (num_layers is not None and layer > num_layers):
                raise ValueError(f"{flag}: layer {layer} is out of range 1..{num_layers}")
    for layer in config.layers:
        if config.metric_of(layer) not in distance.METRICS:
            raise ValueError(
                f"--metric: unknown distance {config.metric_of(layer)!r} for layer {layer}; "
                f"distances: {sorted(distance.METRICS)}"
            )
        if config.objective_of(layer) not in OBJECTIVES:
            raise ValueError(
                f"--objective: unknown objective {config.objective_of(layer)!r} for layer "
                f"{layer}; objectives: {OBJECTIVES}"
            )
    if config.fold not in FOLD_METHODS:
        raise ValueError(f"--fold: unknown method {config.fold!r}; methods: {FOLD_METHODS}")
    if config.cluster_method not in CLUSTER_METHODS:
        raise ValueError(
            f"--cluster: unknown method {config.cluster_method!r}; methods: {CLUSTER_METHODS}"
        )
    if config.bn not in batchnorm.METHODS:
        raise ValueError(f"--bn: unknown method {config.bn!r}; methods: {batchnorm.METHODS}")


def color_model(config: CompressConfig, workdir: str) -> tuple[ModelConfig, dict, str]:
    """The color model to compress: (config, variables, its checkpoint directory)."""
    if config.checkpoint is not None:
        model_config, variables, _ = checkpoint.load_model(config.checkpoint)
        return model_config, variables, os.path.abspath(config.checkpoint)
    if config.model in PRETRAINED and config.dataset == "cifar10_sample":
        path = importlib.resources.files("graycnn") / "assets" / PRETRAINED[config.model]
        model_config, variables, _ = checkpoint.load_model(str(path))
        return model_config, variables, str(path)
    run = os.path.join(workdir, "color_model")
    train_config = train.TrainConfig(
        model=config.model,
        dataset=config.dataset,
        epochs=config.train_epochs,
        seed=config.seed,
        data_dir=config.data_dir,
    )
    model_config, variables, _ = train.train_and_evaluate(train_config, run)
    return model_config, variables, run


def compress(config: CompressConfig, workdir: str) -> dict[str, Any]:
    """Runs the study; writes report.json, report.md, figures and one checkpoint per row.

    Returns:
        The report: {'rows': [...], 'config': {...}}.
    """
    workdir = os.path.abspath(workdir)
    if os.path.exists(os.path.join(workdir, "models")):
        raise FileExistsError(
            f"{workdir} already holds a compress run; pass a new --workdir or delete it"
        )
    validate(config)
    color_config, color_vars, source = color_model(config, workdir)
    if color_config.in_channels != 3:
        raise ValueError(f"{source}: the model to compress must take color (3-channel) input")
    validate(config, len(conv_layers(build_model(color_config), color_config.input_shape)))
    os.makedirs(workdir, exist_ok=True)
    figures = os.path.join(workdir, "figures")
    train_split = data.load_dataset(config.dataset, "train", config.data_dir)
    val = data.load_dataset(config.dataset, "validation", config.data_dir)
    report_figures.plot_color_vs_gray(val.images, os.path.join(figures, "color_vs_gray.png"))
    rows: list[dict[str, Any]] = []

    def add_row(name, key, view, model_config, variables, clusters, bn, **extra):
        row = report.evaluate_row(
            name,
            view,
            model_config,
            variables,
            val,
            workdir,
            os.path.join(workdir, "models", key),
            clusters,
            bn,
            **extra,
        )
        rows.append(row)
        tqdm.write(
            f"{name}: accuracy {row['accuracy']:.4f}, {row['params']:,} params, "
            f"{row['flops']:,} FLOPs"
        )

    # The color rows save the model into the workdir too: every row's checkpoint lives
    # there, and the input checkpoint is only ever read.
    add_row(
        "color model, color images",
        "color",
        "color",
        color_config,
        color_vars,
        {},
        "-",
    )
    add_row(
        "color model, gray images (naive)",
        "color",
        "gray3",
        color_config,
        color_vars,
        {},
        "-",
    )

    model = build_model(color_config)
    fit = merge.fit_gray_coefficients(train_split.images) if config.fold == "fit" else None
    gray_vars = merge.fold_to_gray(
        model, color_vars, config.fold, fit=fit, input_shape=color_config.input_shape
    )
    gray_config = color_config.replace(in_channels=1)
    bn = _bn(config, workdir, "gray")
    add_row(
        f"gray fold ({config.fold}), no BN re-estimation",
        "gray_fold",
        "gray",
        gray_config,
        gray_vars,
        {},
        "none",
    )
    add_row(
        "gray + BN re-estimation, no merge",
        "gray_bn",
        "gray",
        gray_config,
        bn(gray_config, gray_vars),
        {},
        config.bn,
        baseline=True,
    )

    # Merges chain on trees without BN re-estimation, and every row gets one re-estimation
    # of the same budget as the baseline's: a deeper merge gets no extra BN training.
    current = gray_vars
    paths = conv_layers(build_model(gray_config), gray_config.input_shape)
    clusters: dict[int, int] = {}
    merged_config = gray_config
    for layer in tqdm(config.layers, desc="layers", leave=False):
        path = resolve_layer(layer, paths)
        model = build_model(merged_config)
        objective = config.objective_of(layer)
        fields = rf.gradient_ascent(
            model,
            current,
            layer,
            objective="center" if objective == ACTIVATION else objective,
            steps=config.steps,
            seed=config.seed,
            input_shape=merged_config.input_shape[1:],
        )
        rf_figures.plot_receptive_fields(
            fields.fields,
            os.path.join(figures, f"fields_gray_layer{layer}.png"),
            title=f"layer {layer} ({path}) of the gray model",
        )
        color_fields = rf.compute_receptive_fields(
            build_model(color_config),
            color_vars,
            layer,
            objective="center" if objective == ACTIVATION else objective,
            steps=config.steps,
            seed=config.seed,
        )
        rf_figures.plot_color_and_gray(
            color_fields,
            os.path.join(figures, f"fields_color_layer{layer}.png"),
            title=f"layer {layer} ({path}) of the color model",
        )
        stack = fields.fields[..., 0]
        compared = stack
        if objective == ACTIVATION:
            compared = filter_responses(model, current, path, train_split, config.seed)
        distances = np.asarray(distance.pairwise(compared, config.metric_of(layer)))
        result = _cluster(config, layer, distances)
        cluster_figures.plot_distance_matrix(
            distances,
            result.labels,
            os.path.join(figures, f"distances_layer{layer}.png"),
            title=f"layer {layer}: {config.metric_of(layer)} distances",
        )
        cluster_figures.plot_clusters(
            stack, result.labels, os.path.join(figures, f"clusters_layer{layer}.png")
        )
        merged = merge.merge_layer(
            model, current, layer, result.labels, input_shape=merged_config.input_shape
        )
        merged_config = merged_config.replace(
            widths=merge.widths_of(model, merged, merged_config.input_shape)
        )
        clusters[layer] = result.num_clusters
        io.write_json(
            os.path.join(workdir, f"clusters_layer{layer}.json"),
            {
                "layer": layer,
                "path": path,
                "labels": result.labels.tolist(),
                "members": result.members,
                "eps": result.eps,
            },
        )
        names = "+".join(str(n) for n in clusters)
        noun = "layers" if len(clusters) > 1 else "layer"
        add_row(
            f"merged {noun} {names}, no BN re-estimation",
            f"merged_{names}_raw",
            "gray",
            merged_config,
            merged,
            dict(clusters),
            "none",
        )
        current = merged
        add_row(
            f"merged {noun} {names} + BN re-estimation",
            f"merged_{names}",
            "gray",
            merged_config,
            _bn(config, workdir, f"merged_{names}")(merged_config, merged),
            dict(clusters),
            config.bn,
        )

    result = {
        "rows": rows,
        "config": _jsonable(config) | {"color_checkpoint": source, "workdir": workdir},
    }
    io.write_json(os.path.join(workdir, "report.json"), result)
    io.write_text(os.path.join(workdir, "report.md"), report.format_report(result))
    report_figures.plot_accuracy_vs_params(rows, os.path.join(figures, "accuracy_vs_params.png"))
    return result


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


def _bn(config: CompressConfig, workdir: str, key: str):
    def reestimate(model_config: ModelConfig, variables: dict) -> dict:
        return jax.device_get(
            batchnorm.reestimate(
                config.bn,
                model_config,
                variables,
                dataset=config.dataset,
                view="gray",
                workdir=os.path.join(workdir, "bn", key),
                seed=config.seed,
                epochs=config.bn_epochs,
                data_dir=config.data_dir,
            )
        )

    return reestimate


def _cluster(config: CompressConfig, layer: int, distances: np.ndarray) -> cluster.Clustering:
    # A target count uses --cluster; without one, the study's rule: DBSCAN, eps_std.
    if layer in config.num_clusters:
        return cluster.cluster(
            distances, config.cluster_method, num_clusters=config.num_clusters[layer]
        )
    return cluster.cluster(distances, "dbscan", eps_std=config.eps_std)


def _jsonable(config: CompressConfig) -> dict[str, Any]:
    out = dataclasses.asdict(config)
    for key in ("objective", "metric", "num_clusters"):
        out[key] = {str(k): v for k, v in out[key].items()}
    out["layers"] = list(out["layers"])
    return out
