"""The study's Tables 1 and 2: what gray input costs, per model.

Rows, all with the same epochs, optimizer and seed:
    1. color images, from scratch;
    2. gray3 images (luma on 3 channels), from scratch;
    3. gray3 images, fine-tuned from the row-1 color weights;
    4. gray images, 1-channel first conv folded ('sum') from row 1, fine-tuned;
    5. as 4, with only BatchNorm re-estimated instead of fine-tuned.
"""

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax

from graycnn import fold, io
from graycnn.cli import workdir as workdir_lib
from graycnn.config import setting
from graycnn.models import build_model, check_name, count_params
from graycnn.study.figures import charts
from graycnn.training import bn_reestimate, checkpoint, data, evaluation, parallel, train

ROWS = (
    "color_scratch",
    "gray3_scratch",
    "gray3_finetuned",
    "gray_folded_finetuned",
    "gray_folded_bn",
)
_TITLES = {
    "color_scratch": "color, from scratch",
    "gray3_scratch": "gray3, from scratch",
    "gray3_finetuned": "gray3, fine-tuned from color",
    "gray_folded_finetuned": "gray, 1-channel conv folded from color, fine-tuned",
    "gray_folded_bn": "gray, 1-channel conv folded from color, BN re-estimated only",
}


@dataclasses.dataclass(frozen=True)
class BaselinesConfig:
    """What the baselines command adds to the training settings it shares."""

    models: tuple[str, ...] = setting(("resnet20", "densenet_tiny"), "Models.")
    bn: str = setting("train", "Row 5's BN re-estimation.", choices=("train", "recalibrate"))


_BN = {f.name: f for f in dataclasses.fields(BaselinesConfig)}["bn"].metadata["choices"]

# The training settings the command exposes, and its own defaults for them.
TRAIN_FLAGS = ("dataset", "epochs", "batch_size", "learning_rate", "momentum", "seed", "data_dir")
TRAIN_DEFAULTS = {"epochs": 4}


def run_baselines(
    models: Sequence[str],
    workdir: str,
    base: train.TrainConfig,
    bn: str = "train",
) -> dict[str, Any]:
    """Trains and evaluates every row for every model.

    Args:
        models: Model names.
        workdir: Per-row training workdirs (a rerun resumes them), report.md,
            report.json, and accuracy_<model>.png.
        base: Epochs, optimizer, seed and dataset shared by every row.
        bn: BN re-estimation of row 5 ('train' or 'recalibrate').

    Returns:
        {'rows': [{'model', 'row', 'name', 'view', 'accuracy', 'params', 'seconds',
        'checkpoint', 'history'}], 'config': {...}}.
    """
    val = _check(models, base, bn)  # Before the workdir exists.
    with workdir_lib.claim(workdir, "baselines") as workdir:
        return _run_baselines(models, workdir, base, bn, val)


def _run_baselines(models, workdir, base, bn, val):
    rows: list[dict[str, Any]] = []
    for name in models:
        model_rows = _model_rows(dataclasses.replace(base, model=name), workdir, val, bn)
        if parallel.primary():  # every process computes; process 0 writes
            charts.plot_histories(model_rows, os.path.join(workdir, f"accuracy_{name}.png"))
        rows += model_rows
    report = {"rows": rows, "config": dataclasses.asdict(base) | {"models": list(models), "bn": bn}}
    if parallel.primary():
        io.write_json(os.path.join(workdir, "report.json"), report)
        io.write_text(os.path.join(workdir, "report.md"), format_report(report))
    return report


def _check(models: Sequence[str], base: train.TrainConfig, bn: str) -> data.Split:
    """Checks every input before the first row trains (a later model's bad name or a
    dataset too small for a batch would otherwise fail after minutes).

    Returns:
        The validation split every row is evaluated on.

    Raises:
        ValueError: naming the flag at fault.
    """
    if isinstance(models, str) or not models:
        raise ValueError("--models is empty: name at least one model, e.g. --models=resnet20")
    twice = sorted({m for m in models if list(models).count(m) > 1})
    if twice:
        raise ValueError(f"--models lists {', '.join(twice)} twice")
    for name in models:
        check_name(name, "--models")
    if bn not in _BN:
        raise ValueError(f"--bn: unknown value {bn!r}; choose from {', '.join(_BN)}")
    val = data.load_dataset(base.dataset, "validation", base.data_dir)
    if not len(val):
        raise ValueError(
            f"--dataset={base.dataset}: its validation split holds no images (too few per "
            "class), and every row is evaluated on it"
        )
    n = len(data.load_dataset(base.dataset, "train", base.data_dir))
    batch = parallel.check_batch_size(base.batch_size)
    if n < batch:
        raise ValueError(
            f"--batch_size={batch} exceeds the {n} train images of --dataset={base.dataset}"
        )
    train.check_epochs(base.epochs, n // batch)
    if bn == "recalibrate" and n < bn_reestimate.RECALIBRATE_BATCH:
        raise ValueError(
            f"--bn=recalibrate needs a batch of {bn_reestimate.RECALIBRATE_BATCH} train images; "
            f"--dataset={base.dataset} has {n}"
        )
    return val


def _model_rows(
    config: train.TrainConfig, workdir: str, val: data.Split, bn: str
) -> list[dict[str, Any]]:
    """The five rows of `config.model`, each trained in workdir/<model>/<row>."""
    name = config.model

    def run(row, view, init=None):
        directory = os.path.join(workdir, name, row)
        start = time.perf_counter()
        model_config, variables, _ = train.train_and_evaluate(
            dataclasses.replace(config, view=view), directory, init=init
        )
        seconds = time.perf_counter() - start
        return _row(name, row, view, model_config, variables, val, directory, seconds)

    color = run("color_scratch", "color")
    rows = [color, run("gray3_scratch", "gray3")]
    color_config, color_vars, _ = checkpoint.load_model(color["checkpoint"])
    rows.append(run("gray3_finetuned", "gray3", init=(color_config, color_vars)))
    gray_config = color_config.replace(in_channels=1)
    folded = fold.fold_to_gray(
        build_model(color_config), color_vars, "sum", input_shape=color_config.input_shape
    )
    rows.append(run("gray_folded_finetuned", "gray", init=(gray_config, folded)))
    start = time.perf_counter()
    directory = os.path.join(workdir, name, "gray_folded_bn")
    reestimated = jax.device_get(
        bn_reestimate.reestimate(
            bn,
            gray_config,
            folded,
            dataset=config.dataset,
            view="gray",
            workdir=directory,
            seed=config.seed,
            data_dir=config.data_dir,
        )
    )
    model_dir = os.path.join(directory, "model")
    if not parallel.from_primary(lambda: os.path.exists(model_dir)):  # all save, or none
        checkpoint.save_model(model_dir, gray_config, reestimated)
    seconds = time.perf_counter() - start
    rows.append(
        _row(name, "gray_folded_bn", "gray", gray_config, reestimated, val, model_dir, seconds)
    )
    return rows


def _row(model, row, view, model_config, variables, val, directory, seconds) -> dict[str, Any]:
    history = [epoch["val_accuracy"] for epoch in train.read_history(directory)]
    return {
        "model": model,
        "row": row,
        "name": _TITLES[row],
        "view": view,
        "accuracy": evaluation.evaluate(model_config, variables, val, view)["accuracy"],
        "params": count_params(variables),
        "seconds": seconds,
        "checkpoint": directory,
        "history": history,
    }


def format_report(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        "# graycnn baselines (the study's Tables 1 and 2)",
        "",
        f"Dataset {c['dataset']}, {c['epochs']} epochs, SGD lr {c['learning_rate']} momentum "
        f"{c['momentum']}, batch {c['batch_size']}, seed {c['seed']}; row 5 re-estimates "
        f"BatchNorm by '{c['bn']}'.",
        "",
        "| model | row | input | accuracy | params | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} | {r['name']} | {r['view']} | {100 * r['accuracy']:.2f}% "
            f"| {r['params']:,} | {r['seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"
