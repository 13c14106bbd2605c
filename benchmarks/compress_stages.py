"""Wall time of each stage of the compress study on its default, one layer.

    python -m benchmarks.compress_stages            # layer 1, ~1 min on 2 CPU cores
    python -m benchmarks.compress_stages --layer=2

Calls the library functions that `graycnn.compress.compress` calls, in its order, on
`CompressConfig()` (the shipped densenet_tiny, cifar10_sample), and times each with its
outputs ready: load (color model and data), fold, fields (gray receptive fields of the
layer), distances, cluster, merge, bn (re-estimation) and evaluate (accuracy and FLOPs
of the merged model). Each stage runs once, as in a compress run, so its time includes
compilation (the persistent compilation cache is on: a second run of the command loads
programs instead of compiling them). Stages are independent functions of the previous
stage's outputs, listed in `STAGES`: when compress.py changes, re-point them there.
"""

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import flags

from graycnn import batchnorm, cluster, compress, data, distance, merge, runtime, train
from graycnn import receptive_field as rf
from graycnn.models import build_model


def _load(config: compress.CompressConfig, s: dict[str, Any]) -> None:
    s["color_config"], s["color_vars"], _ = compress.color_model(config, s["workdir"])
    s["train_split"] = data.load_dataset(config.dataset, "train", config.data_dir)
    s["val"] = data.load_dataset(config.dataset, "validation", config.data_dir)


def _fold(config: compress.CompressConfig, s: dict[str, Any]) -> None:
    model = build_model(s["color_config"])
    fit = None
    if config.fold == "fit":
        fit = merge.fit_gray_coefficients(s["train_split"].images)
    s["gray_vars"] = merge.fold_to_gray(
        model, s["color_vars"], config.fold, fit=fit, input_shape=s["color_config"].input_shape
    )
    s["gray_config"] = s["color_config"].replace(in_channels=1)


def _fields(config: compress.CompressConfig, s: dict[str, Any]) -> None:
    objective = config.objective_of(s["layer"])
    s["fields"] = rf.gradient_ascent(
        build_model(s["gray_config"]),
        s["gray_vars"],
        s["layer"],
        objective="center" if objective == compress.ACTIVATION else objective,
        steps=config.steps,
        seed=config.seed,
        input_shape=s["gray_config"].input_shape[1:],
    )


def _distances(config: compress.CompressConfig, s: dict[str, Any]) -> None:
    compared = s["fields"].fields[..., 0]
    if config.objective_of(s["layer"]) == compress.ACTIVATION:
        path = s["fields"].path
        model = build_model(s["gray_config"])
        compared = compress.filter_responses(
            model, s["gray_vars"], path, s["train_split"], config.seed
        )
    s["distances"] = np.asarray(distance.pairwise(compared, config.metric_of(s["layer"])))


def _cluster(config: compress.CompressConfig, s: dict[str, Any]) -> None:
    if s["layer"] in config.num_clusters:
        s["labels"] = cluster.cluster(
            s["distances"], config.cluster_method, num_clusters=config.num_clusters[s["layer"]]
        ).labels
    else:
        s["labels"] = cluster.cluster(s["distances"], "dbscan", eps_std=config.eps_std).labels


def _merge(config: compress.CompressConfig, s: dict[str, Any]) -> None:
    model = build_model(s["gray_config"])
    shape = s["gray_config"].input_shape
    s["merged"] = merge.merge_layer(
        model, s["gray_vars"], s["layer"], s["labels"], input_shape=shape
    )
    s["merged_config"] = s["gray_config"].replace(widths=merge.widths_of(model, s["merged"], shape))


def _bn(config: compress.CompressConfig, s: dict[str, Any]) -> None:
    s["bn_vars"] = batchnorm.reestimate(
        config.bn,
        s["merged_config"],
        s["merged"],
        dataset=config.dataset,
        view="gray",
        workdir=os.path.join(s["workdir"], "bn"),
        seed=config.seed,
        epochs=config.bn_epochs,
        data_dir=config.data_dir,
    )


def _evaluate(config: compress.CompressConfig, s: dict[str, Any]) -> None:
    del config
    mc = s["merged_config"]
    s["accuracy"] = train.evaluate(mc, s["bn_vars"], s["val"], "gray")["accuracy"]
    s["flops"] = merge.count_flops(build_model(mc), s["bn_vars"], mc.input_shape)["total"]


# (stage, function of (config, state)): each reads what earlier stages put in `state`.
STAGES: tuple[tuple[str, Callable[[compress.CompressConfig, dict[str, Any]], None]], ...] = (
    ("load", _load),
    ("fold", _fold),
    ("fields", _fields),
    ("distances", _distances),
    ("cluster", _cluster),
    ("merge", _merge),
    ("bn", _bn),
    ("evaluate", _evaluate),
)


def time_stages(
    config: compress.CompressConfig | None = None, layer: int = 1
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs the stages for `layer` in a temporary workdir.

    Returns:
        ([{'stage', 'seconds'}, ...], {'accuracy', 'flops', 'clusters'} of the merged model).
    """
    config = config or compress.CompressConfig()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        state: dict[str, Any] = {"workdir": workdir, "layer": layer}
        for name, stage in STAGES:
            start = time.perf_counter()
            stage(config, state)
            jax.block_until_ready([v for v in state.values() if isinstance(v, jax.Array)])
            rows.append({"stage": name, "seconds": time.perf_counter() - start})
    summary = {
        "accuracy": state["accuracy"],
        "flops": state["flops"],
        "clusters": int(len(set(np.asarray(state["labels"]).tolist()))),
    }
    return rows, summary


_LAYER = flags.DEFINE_integer("layer", 1, "The conv layer to merge (the default run: 1, 2).")


def main(argv):
    del argv
    print(f"compress stages, default config, layer {_LAYER.value}; load {os.getloadavg()}")
    rows, summary = time_stages(layer=_LAYER.value)
    for r in rows:
        print(f"{r['stage']:<10} {r['seconds']:8.2f} s")
    print(f"{'total':<10} {sum(r['seconds'] for r in rows):8.2f} s; merged model: {summary}")


if __name__ == "__main__":
    runtime.setup()
    runtime.run(main)
