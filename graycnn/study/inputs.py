"""What a compress run starts from, read and checked before any long work: the data
splits, the color model to compress, and the merge steps.

The checks come first (`read_splits`, `check_data`, `check_layers`), then the color model
(minutes, if it is trained) and `load_splits`, which matches the data to it;
`plan_steps` checks the merge steps against the model. `graycnn.study.stages`
re-exports every name, and `pipeline.compress` calls them from there.
"""

import dataclasses
import hashlib
import importlib.resources
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from graycnn import graph as graph_lib
from graycnn.layers import resolve_layer
from graycnn.models import ModelConfig, build_model, init_variables
from graycnn.study.config import CompressConfig, validate
from graycnn.training import bn_reestimate, checkpoint, data, evaluation
from graycnn.training import train as train_lib

# Made by `python -m experiments.train --epochs=40 --seed=0 --workdir=DIR` (densenet_tiny)
# and `... --model=densenet_seed --epochs=15 --seed=0 ...` (docs/results.md).
PRETRAINED = {"densenet_tiny": "densenet_tiny_color", "densenet_seed": "densenet_seed_color"}


def pretrained_path(model: str) -> str:
    """The shipped pretrained color checkpoint of `model` (a key of PRETRAINED)."""
    return str(importlib.resources.files("graycnn") / "assets" / PRETRAINED[model])


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
        needs.append(("the --target_* search", None, SEARCH_BN_BATCH))
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
    """--layers and --num_clusters (with a --target_*, every conv's flags) against the
    architecture before a color model is trained for minutes: its shapes alone, from the
    same ModelConfig training makes. (A checkpoint's or the shipped model, read in
    seconds, is checked by `plan_steps`, or before the search.)

    Raises:
        ValueError: naming the flag, as `plan_steps` does.
    """
    if not _trains_color(config):
        return
    model_config = ModelConfig(
        config.model,
        in_channels=3,
        num_classes=splits.train.num_classes,
        image_size=splits.train.images.shape[1],
        class_names=splits.train.class_names or (),
    )
    shapes = jax.eval_shape(lambda: init_variables(model_config, jax.random.key(0)))
    if config.target:  # the search picks the layers: each conv's flags are checked
        validate(config, Model(model_config, shapes).widths())
    else:
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
        path = pretrained_path(config.model)
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
