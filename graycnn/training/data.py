"""Datasets as uint8 arrays, the color/gray views, and seeded augmentation.

Names:
    cifar10          the stock TFDS builder: train = the first 90% of the official
                     training set, validation = its last 10%, test = the official test
                     set; needs internet once.
    cifar10_sample   the embedded default: 5,085 real CIFAR-10 training images, split
                     class-balanced (per class, in file order) into 3,085 train, 1,000
                     test (the 100 before the last 100) and 1,000 validation (the last
                     100), so everything runs offline.
    digits           scikit-learn's 1,797 handwritten digits (load_digits, offline), 8x8
                     gray (N, 8, 8, 1), its 0..16 levels scaled to 0-255 (v * 255 / 16,
                     rounded), classes '0'..'9'. Split per class in file order: the last
                     20% of each class test, the 10% before them validation, the rest
                     train (1,259 / 179 / 359 images).
    npz:PATH         arrays `images` (N, H, W, C) uint8 and `labels` (N,) int.
    folder:PATH      one subfolder per class of image files (hidden files are skipped;
                     images beside the class folders are refused, other files there
                     skipped). Each image is decoded by `read_image` to exact 0-255
                     pixels or refused naming its mode; a folder of gray images is
                     (N, H, W, 1), one holding any color image (N, H, W, 3).
Images holding only 0 and 1 (masks) are refused: models take 0-255 pixels.
For npz and folder datasets, `validation` is the same kind of class-balanced split (20%
of each class, the last images in order), there is no `test`, and `all` is everything.

Splits have one purpose each: `train` fits weights, `validation` is where choices are
made (levers, budgets, early looks), and `test` is reported and never chosen on.

Classes. Labels are class indices 0..K-1 (K at most `MAX_CLASSES`). A dataset either
names its classes (`Split.class_names`: CIFAR-10's ten names, a folder's sorted
subfolder names) or only indexes them (an npz file; a folder whose subfolders are all
numbers, "0", "1", ..., whose labels are those numbers). When a model meets a dataset
(`match_classes`), a named dataset is mapped onto the model's classes by name, so a
folder holding only `cat/` is scored as CIFAR-10 class 3 by a CIFAR-10 model; an indexed
one must have labels below the model's class count. Anything else is an error naming the
labels or names at fault.

Files are read by `graycnn.training.dataset_files`; the views and augmentation a step
applies are `graycnn.training.transforms`. Their public names are importable from here.
"""

import dataclasses
import importlib.resources
import socket
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from graycnn.training.dataset_files import (
    MAX_CLASSES,
    check_arrays,
    few,
    read_folder,
    read_image,
    read_npz,
)
from graycnn.training.transforms import VIEWS, apply_view, augment, view_channels

# The public names, those of dataset_files and transforms included.
__all__ = [
    "CIFAR10_CLASSES",
    "DATASET_HELP",
    "MAX_CLASSES",
    "SPLITS",
    "VIEWS",
    "Split",
    "apply_view",
    "augment",
    "default_eval_split",
    "iterate_batches",
    "known_class_names",
    "load_dataset",
    "match_classes",
    "read_image",
    "view_channels",
]

DATASET_HELP = "cifar10, cifar10_sample (embedded), digits, npz:PATH or folder:PATH."
SPLITS = ("train", "validation", "test", "all")
# Per class, from the end of the file order: validation, then test before it.
_SAMPLE_HELD_OUT_PER_CLASS = {"validation": 100, "test": 100}
_VALIDATION_FRACTION = 0.2
# Fractions of each class, from the end of the file order: test, then validation.
_DIGITS_HELD_OUT_FRACTION = {"test": 0.2, "validation": 0.1}
DIGITS_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_NAMED = {
    "cifar10": CIFAR10_CLASSES,
    "cifar10_sample": CIFAR10_CLASSES,
    "digits": DIGITS_CLASSES,
}
_CIFAR10_HOST = "www.cs.toronto.edu"  # Where TFDS downloads CIFAR-10 from.


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes:
        images: (N, H, W, C) uint8, C in {1, 3}.
        labels: (N,) int32.
        num_classes: Number of classes of the dataset (not only of this split).
        class_names: The name of each class 0..num_classes-1, or None for a dataset that
            only indexes its classes (an npz file).
        source: The dataset's name as the user gave it, for error messages.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] | None = None
    source: str = "dataset"

    def __len__(self) -> int:
        return len(self.labels)


def load_dataset(name: str, split: str = "train", data_dir: str | None = None) -> Split:
    """Loads split `split` ('train', 'validation' or 'all') of dataset `name`.

    Raises:
        ValueError: unknown name or split, or arrays of the wrong shape (naming the path).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {SPLITS}")
    if name == "cifar10":
        return _load_tfds_cifar10(split, data_dir)
    if name == "cifar10_sample":
        path = importlib.resources.files("graycnn") / "assets" / "cifar10_sample.npz"
        with importlib.resources.as_file(path) as p:
            images, labels = read_npz(str(p))
        return _split(
            images, labels, split, name, CIFAR10_CLASSES, per_class=_SAMPLE_HELD_OUT_PER_CLASS
        )
    if name == "digits":
        return _split(*_digits(), split, name, DIGITS_CLASSES, per_class=_DIGITS_HELD_OUT_FRACTION)
    if name.startswith("npz:"):
        return _split(*read_npz(name[4:]), split, name)
    if name.startswith("folder:"):
        images, labels, class_names = read_folder(name[7:])
        return _split(images, labels, split, name, class_names)
    raise ValueError(
        f"unknown dataset {name!r}; use cifar10, cifar10_sample, digits, npz:PATH or folder:PATH"
    )


def known_class_names(name: str) -> tuple[str, ...] | None:
    """The class names of a named dataset (cifar10, cifar10_sample, digits), else None."""
    return _NAMED.get(name)


def match_classes(
    split: Split, num_classes: int, class_names: Sequence[str] | None = None
) -> Split:
    """Returns `split` with its labels as indices of a model's classes.

    A dataset that names its classes is mapped by name onto a model that names its
    classes (a subset of them is fine); onto a model that does not, by position, and only
    if both have the same number of classes. An indexed dataset keeps its labels, which
    must be below `num_classes`.

    Args:
        split: The data.
        num_classes: The model's number of outputs.
        class_names: The model's class names (index i -> name), or None/() if unknown.

    Returns:
        `split` itself when nothing changes, else a copy with remapped labels and the
        model's `num_classes`.

    Raises:
        ValueError: naming the dataset and the labels or class names the model lacks.
    """
    class_names = tuple(class_names or ())
    labels = split.labels
    if split.class_names is not None and split.class_names != class_names:
        if class_names:
            unknown = [n for n in split.class_names if n not in class_names]
            if unknown:
                raise ValueError(
                    f"{split.source}: classes {few(unknown)} are unknown to the model, whose "
                    f"classes are {', '.join(class_names)}; name the class folders after "
                    f"those, or by class index 0..{num_classes - 1}"
                )
            table = np.array([class_names.index(n) for n in split.class_names], np.int32)
            labels = table[labels]
        elif len(split.class_names) != num_classes:
            raise ValueError(
                f"{split.source}: {len(split.class_names)} classes "
                f"({few(split.class_names)}) but the model has {num_classes} unnamed classes; "
                f"name the class folders by class index 0..{num_classes - 1}"
            )
    bad = np.unique(labels[labels >= num_classes])
    if bad.size:
        hint = (
            " (1-based labels? the model's classes are numbered from 0)"
            if labels.min() == 1 and labels.max() == num_classes
            else ""
        )
        raise ValueError(
            f"{split.source}: labels {few(bad.tolist())} ({np.isin(labels, bad).sum()} "
            f"examples) are not classes of the model, which has {num_classes} classes "
            f"0..{num_classes - 1}{hint}"
        )
    if labels is split.labels and split.num_classes == num_classes:
        return split
    return dataclasses.replace(
        split, labels=labels, num_classes=num_classes, class_names=class_names or None
    )


def default_eval_split(name: str) -> str:
    """The split a user evaluating on dataset `name` means: all of a file or folder they
    pass, the held-out split of the named datasets."""
    return "all" if name.startswith(("npz:", "folder:")) else "validation"


def iterate_batches(
    data: Split, batch_size: int, *, seed: int | None = None, drop_remainder: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (images, labels, mask) of exactly `batch_size` rows; padding rows have mask 0.

    Args:
        seed: Shuffles with this seed; None keeps file order.
        drop_remainder: Skip the last partial batch instead of padding it.
    """
    order = np.arange(len(data))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(data))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < batch_size and drop_remainder:
            return
        mask = np.ones(batch_size, np.float32)
        if len(idx) < batch_size:
            mask[len(idx) :] = 0
            idx = np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)])
        yield data.images[idx], data.labels[idx], mask


def _split(
    images: np.ndarray,
    labels: np.ndarray,
    split: str,
    source: str,
    class_names: tuple[str, ...] | None = None,
    per_class: Mapping[str, float] | None = None,
) -> Split:
    """Class-balanced held-out splits taken from the end of each class, in file order.

    Args:
        per_class: {'validation': k, 'test': k}: the last k of each class are validation,
            the k before them test (in the dict's order from the end: the first key is
            the last images); a float k is that fraction of the class, rounded. None: the
            last 20% of each class are validation and there is no test split.
    """
    num_classes = len(class_names) if class_names else int(labels.max()) + 1
    if split == "all":
        return Split(images, labels, num_classes, class_names, source)
    if split == "test" and not (per_class or {}).get("test"):
        raise ValueError(
            f"dataset {source!r} has no test split: pass held-out data as its own dataset "
            "(e.g. --eval_dataset=npz:PATH)"
        )
    part = np.full(len(labels), "train", dtype=object)
    # Only the classes present: linear in the number of images, whatever the labels.
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        end = len(idx)
        for name, share in (per_class or {"validation": _VALIDATION_FRACTION}).items():
            is_fraction = per_class is None or isinstance(share, float)
            k = min(int(round(len(idx) * share)) if is_fraction else int(share), end)
            part[idx[end - k : end]] = name
            end -= k
    keep = part == split
    return Split(images[keep], labels[keep], num_classes, class_names, source)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 (N, 8, 8, 1) 0-255 images and int32 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int32)


def _check_reachable(host: str, data_dir: str | None) -> None:
    """Raises ValueError at once if `host` cannot be reached: offline, TFDS would retry
    its download with backoff for minutes before failing."""
    try:
        socket.create_connection((host, 443), timeout=10).close()
    except OSError as e:
        raise ValueError(
            f"cifar10 is not prepared in {data_dir or 'the TFDS data directory'} and its "
            f"download host {host} cannot be reached ({e}); connect to the internet once, or "
            "pass --data_dir=DIR holding a prepared copy"
        ) from e


def _load_tfds_cifar10(split: str, data_dir: str | None) -> Split:
    import tensorflow_datasets as tfds

    tfds_split = {
        "train": "train[:90%]",
        "validation": "train[90%:]",
        "test": "test",
        "all": "train+test",
    }[split]
    if not tfds.builder("cifar10", data_dir=data_dir).is_prepared():
        _check_reachable(_CIFAR10_HOST, data_dir)
    # Batches of 10,000 rather than batch_size=-1: the latter aborts the process under
    # tfds.testing.mock_data (std::length_error), which the tests use.
    ds = tfds.load(
        "cifar10", split=tfds_split, batch_size=10_000, as_supervised=True, data_dir=data_dir
    )
    batches = list(tfds.as_numpy(ds))
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    images, labels = check_arrays(images, labels, "tfds:cifar10")
    return Split(images, labels, 10, CIFAR10_CLASSES, "cifar10")
