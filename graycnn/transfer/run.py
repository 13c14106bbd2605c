"""scratch, transfer and merged trained the same number of steps on the user's images.

    color model --fold--> gray --new head--> transfer
    gray --merge (clusters on the user's images, lstsq refit)--> new head--> merged
    (the merged layers: --layers and --num_clusters, or with --target_flops the plan of
    `graycnn.transfer.budget`, searched on the training split alone)
    the gray architecture, random init --> scratch

Each is trained `steps` SGD steps (graycnn.training.train's step and optimizer), its
validation accuracy recorded every `eval_every` steps (the curve).
"""

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from graycnn import config as config_lib
from graycnn import deploy
from graycnn.config import PerLayer
from graycnn.models import build_model, init_variables
from graycnn.study import stages, stats
from graycnn.study.config import CompressConfig
from graycnn.study.inputs import pretrained_path
from graycnn.training import checkpoint, data, evaluation, parallel
from graycnn.training import train as train_lib
from graycnn.transfer import budget
from graycnn.transfer import data as transfer_data
from graycnn.transfer.config import TransferConfig
from graycnn.transfer.head import new_head

KINDS = ("scratch", "transfer", "merged")


def color_model(config: TransferConfig) -> stages.Model:
    """The color checkpoint (default the shipped densenet_tiny)."""
    path = config.checkpoint or pretrained_path("densenet_tiny")
    model_config, variables, _ = checkpoint.load_model(path)
    if model_config.in_channels != 3:
        raise ValueError(f"--checkpoint={path}: a color (3-channel) model is needed")
    return stages.Model(model_config, variables, path)


def compress_config(config: TransferConfig) -> CompressConfig:
    """The merged model's settings as compress takes them: clusters of the filters'
    responses to the user's images (compress's default objective), each merge refit by
    least squares; steps=1: the receptive fields that plan_layer_merge also computes are
    only for compress's figures. Only the merged layers' counts are passed: compress
    refuses a count for a layer it does not merge, and transfer's defaults name three."""
    return CompressConfig(
        layers=config.layers,
        num_clusters=config.num_clusters.only(config.layers),
        compensate="lstsq",
        seed=config.seed,
        steps=1,
    )


def build_models(
    config: TransferConfig, color: stages.Model, train: data.Split, size: int
) -> tuple[dict[str, stages.Model], dict[str, Any] | None]:
    """({kind: the model before training}, each with a head for `train`'s classes; the
    --target_flops plan (`budget.Plan.to_json`), or None without the flag)."""
    classes, names = train.num_classes, train.class_names or ()
    color = stages.Model(color.config.replace(image_size=size), color.variables, color.source)
    compress = compress_config(config)
    gray = stages.fold_color_model(compress, color, train)
    rng = jax.random.key(config.seed + 7)
    scratch_config, _ = new_head(gray.config, gray.variables, classes, rng, names)
    scratch = init_variables(scratch_config, jax.random.key(config.seed))
    transfer_model = stages.Model(*new_head(gray.config, gray.variables, classes, rng, names))
    searched = None
    if config.target_flops is not None:
        searched = budget.plan_merges(config, transfer_model, train)
        compress = dataclasses.replace(
            compress, layers=tuple(layer for layer, _ in searched.steps),
            num_clusters=PerLayer.of_dict(dict(searched.steps)),
        )  # fmt: skip
    merged = gray
    for layer, count in stages.plan_steps(compress, gray):
        plan = stages.plan_layer_merge(
            compress, merged, layer, count, train, color, config.seed, figures=False
        ).plan
        merged, _ = stages.merge_and_compensate(compress, merged, plan, train, config.seed, color)
    out = {"scratch": stages.Model(scratch_config, jax.device_get(scratch))}
    out["transfer"] = transfer_model
    out["merged"] = stages.Model(*new_head(merged.config, merged.variables, classes, rng, names))
    return out, None if searched is None else searched.to_json()


def train_curve(
    config: TransferConfig, model: stages.Model, train: data.Split, val: data.Split, lr: float
) -> tuple[stages.Model, list[list[float]], float]:
    """(the trained model, [[step, validation accuracy], ...] from step 0, training
    seconds without the evaluations)."""
    settings = train_lib.TrainConfig(
        epochs=1, batch_size=config.batch_size, learning_rate=lr, seed=config.seed
    )
    tx = train_lib.make_optimizer(settings, config.steps)  # the schedule over all steps
    step_fn = train_lib.make_train_step(build_model(model.config), tx, "gray", config.augment)
    batch_sharding, replicated = parallel.mesh_shardings()
    state = jax.device_put(train_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=model.variables["params"],
        batch_stats=model.variables.get("batch_stats", {}),
        opt_state=tx.init(model.variables["params"]),
    ), replicated)  # fmt: skip
    rng = jax.random.key(config.seed + 1)
    curve = [[0, _accuracy(model.config, state.variables, val)]]
    seconds = 0.0
    bar = tqdm(_batches(config, train), total=config.steps, mininterval=1.0, leave=False)
    for step, (images, labels) in enumerate(bar, start=1):
        start = time.perf_counter()
        batch = parallel.shard_batch(batch_sharding, images, labels)
        state, metrics = step_fn(state, *batch, jax.random.fold_in(rng, step))
        jax.block_until_ready(metrics)
        seconds += time.perf_counter() - start
        if step % config.eval_every == 0 or step == config.steps:
            curve.append([step, _accuracy(model.config, state.variables, val)])
            bar.set_postfix(val_acc=f"{curve[-1][1]:.3f}")
    trained = stages.Model(model.config, jax.device_get(state.variables))
    return trained, curve, seconds


def _batches(config: TransferConfig, train: data.Split):
    """`config.steps` shuffled full batches, a new order each epoch."""
    if len(train) < config.batch_size:
        raise ValueError(f"--batch_size={config.batch_size} exceeds the {len(train)} train images")
    done, epoch = 0, 0
    while True:
        seed = config.seed * 100_003 + epoch
        for images, labels, _ in data.iterate_batches(
            train, config.batch_size, seed=seed, drop_remainder=True
        ):
            if done == config.steps:
                return
            done += 1
            yield images, labels
        epoch += 1


def _accuracy(model_config, variables, split: data.Split) -> float:
    return float(evaluation.evaluate(model_config, variables, split, "gray")["accuracy"])


def transfer(config: TransferConfig) -> dict[str, Any]:
    """Runs the three models; returns the report's content (`graycnn.transfer.report`)."""
    splits = transfer_data.load(config)
    color = color_model(config)
    original = splits.train.images.shape[1:3]
    splits, size = transfer_data.fit_size(config, splits, color.config)
    models, plan = build_models(config, color, splits.train, size)
    held = splits.held_out if splits.held_out is not None and len(splits.held_out) else None
    rows, correct, trained_models = [], {}, {}
    for kind in KINDS:
        model = models[kind]
        tqdm.write(f"{kind}: training {config.steps} steps")
        lr = config.learning_rate if kind == "scratch" else config.finetune_lr
        start = time.perf_counter()
        trained, curve, seconds = train_curve(config, model, splits.train, splits.validation, lr)
        final = evaluation.evaluate(trained.config, trained.variables, held or splits.validation,
                                    "gray")  # fmt: skip
        correct[kind], trained_models[kind] = final["correct"], trained
        rows.append({
            "kind": kind, **stages.size(trained), "eval": {"accuracy": 100 * final["accuracy"]},
            "validation": 100 * curve[-1][1], "curve": curve, "train_seconds": seconds,
            "wall_seconds": time.perf_counter() - start,
        })  # fmt: skip
    report = _summarize(config, rows, correct, splits, (original, size), held is not None)
    if plan is not None:
        report["plan"] = plan
    if config.export and parallel.primary():  # files: process 0 writes them
        report["export"] = _export(config.export, report["rows"], trained_models, splits)
    return report


def _export(directory: str, rows, models, splits) -> dict[str, Any]:
    """The best row's model (validation accuracy, then fewer FLOPs) as deployable files."""
    best = max(rows, key=lambda r: (r["validation"], -r["flops"]))["kind"]
    model = models[best]
    images = data.apply_view(splits.validation.images[:256], "gray")
    result = deploy.export_model(model.config, model.variables, directory, images)
    return {"kind": best, "directory": directory, "max_abs_diff": dict(result.max_abs_diff)}


def _summarize(config, rows, correct, splits, sizes, has_held) -> dict[str, Any]:
    target = rows[0]["curve"][-1][1]  # scratch's final validation accuracy
    for row in rows:
        reached = [s for s, a in row["curve"] if a >= target]
        row["steps_to_scratch"] = reached[0] if reached else None
        if row["kind"] != "transfer":
            row["eval"] |= stats.compare(
                correct[row["kind"]], correct["transfer"], seed=config.seed
            )
    original, size = sizes
    return {
        "settings": config_lib.to_json(config),
        "images": {
            "original": list(original),
            "model": [size, size],
            "resized": config.resize and tuple(original) != (size, size),
        },
        "data": {
            "train": len(splits.train),
            "validation": len(splits.validation),
            "eval": splits.held_out_name if has_held else "validation",
        },
        "rows": rows,
    }
