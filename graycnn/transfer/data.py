"""The user's splits for a transfer run: loaded, checked and resized before any work."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from graycnn.models import ModelConfig, build_model
from graycnn.training import data
from graycnn.transfer.config import TransferConfig


@dataclasses.dataclass(frozen=True)
class Splits:
    """train fits, validation gives the curve, held_out (if any) the final accuracy."""

    train: data.Split
    validation: data.Split
    held_out: data.Split | None
    held_out_name: str | None


def load(config: TransferConfig) -> Splits:
    """The splits, classes checked: at least 2 in train, none in the eval data that train
    lacks.

    Raises:
        ValueError: naming the flag and the classes at fault.
    """
    train = data.load_dataset(config.dataset, "train")
    validation = data.load_dataset(config.dataset, "validation")
    present = np.unique(train.labels)
    if present.size < 2:
        raise ValueError(
            f"--dataset={config.dataset}: its training split holds one class "
            f"({_names(train, present)}); a classifier needs at least 2"
        )
    held_out, held_name = None, None
    if config.eval_dataset is not None:
        held_name = config.eval_dataset
        held_out = data.load_dataset(held_name, data.default_eval_split(held_name))
    elif config.dataset == "digits" or config.dataset.startswith("cifar10"):
        held_name = f"{config.dataset} test split"
        held_out = data.load_dataset(config.dataset, "test")
    for split, flag in ((validation, "--dataset validation"), (held_out, "--eval_dataset")):
        if split is not None and len(split):
            _check_classes(train, split, flag)
    return Splits(train, validation, held_out, held_name)


def _names(split: data.Split, labels) -> str:
    names = split.class_names
    return ", ".join(names[int(i)] if names else str(int(i)) for i in labels)


def _check_classes(train: data.Split, other: data.Split, flag: str) -> None:
    """Raises ValueError unless every class of `other` is a class of `train`."""
    if train.class_names is not None and other.class_names is not None:
        unknown = sorted(set(other.class_names) - set(train.class_names))
        if unknown:
            raise ValueError(
                f"{flag} ({other.source}): classes {', '.join(unknown)} are not classes of "
                f"--dataset ({', '.join(train.class_names)})"
            )
        return
    if (train.class_names is None) != (other.class_names is None):
        raise ValueError(
            f"{flag} ({other.source}) and --dataset ({train.source}): one names its classes, "
            "the other only numbers them; give both class folders with the same names"
        )
    extra = np.setdiff1d(np.unique(other.labels), np.unique(train.labels))
    if extra.size:
        raise ValueError(
            f"{flag} ({other.source}): labels {', '.join(map(str, extra.tolist()))} are not "
            f"classes of --dataset ({train.source})"
        )


def fit_size(
    config: TransferConfig, splits: Splits, model_config: ModelConfig
) -> tuple[Splits, int]:
    """(the splits at the model's input size, that size): resized to the color model's
    size with --resize, else the size of the images, if the model can take it."""
    size = splits.train.images.shape[1:3]
    for split in (splits.validation, splits.held_out):
        if split is not None and len(split) and split.images.shape[1:3] != size:
            raise ValueError(
                f"{split.source}: images are {split.images.shape[1:3]}, the training images "
                f"{size}; give images of one size"
            )
    if size[0] != size[1] and not config.resize:
        raise ValueError(f"--resize=false: images are {size}, the model takes square images")
    target = model_config.image_size if config.resize else size[0]
    if not config.resize:
        try:
            jax.eval_shape(
                build_model(model_config.replace(image_size=target, in_channels=1)).init,
                jax.random.key(0),
                jnp.zeros((1, target, target, 1)),
            )
        except ValueError as e:
            raise ValueError(
                f"--resize=false: the model cannot take {size[0]}x{size[1]} images ({e}); "
                "pass --resize=true"
            ) from None
    if size == (target, target):
        return splits, target
    held = None if splits.held_out is None else resize(splits.held_out, target)
    train, validation = resize(splits.train, target), resize(splits.validation, target)
    return Splits(train, validation, held, splits.held_out_name), target


def resize(split: data.Split, size: int) -> data.Split:
    """`split` with its images resized (bilinear, antialiased) to size x size, uint8."""
    if len(split) == 0:
        shape = (0, size, size, split.images.shape[-1])
        return dataclasses.replace(split, images=np.zeros(shape, np.uint8))
    shape = (len(split), size, size, split.images.shape[-1])
    out = jax.image.resize(jnp.asarray(split.images, jnp.float32), shape, "bilinear")
    images = np.clip(np.round(np.asarray(out)), 0, 255).astype(np.uint8)
    return dataclasses.replace(split, images=images)
