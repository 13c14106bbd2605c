"""Datasets as uint8 arrays, the color/gray views, and seeded augmentation.

Names:
    cifar10          the stock TFDS builder: train = the first 90% of the official
                     training set, validation = its last 10%, test = the official test
                     set; needs internet once.
    cifar10_sample   the embedded default: 5,085 real CIFAR-10 training images, split
                     class-balanced (per class, in file order) into 3,085 train, 1,000
                     test (the 100 before the last 100) and 1,000 validation (the last
                     100), so everything runs offline.
    npz:PATH         arrays `images` (N, H, W, C) uint8 and `labels` (N,) int.
    folder:PATH      one subfolder per class (sorted names) of image files.
For npz and folder datasets, `validation` is the same kind of class-balanced split (20%
of each class, the last images in order), there is no `test`, and `all` is everything.

Splits have one purpose each: `train` fits weights, `validation` is where choices are
made (levers, budgets, early looks), and `test` is reported and never chosen on.
"""

import dataclasses
import importlib.resources
import os
from collections.abc import Iterator

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

VIEWS = ("color", "gray", "gray3")
DATASET_HELP = "cifar10, cifar10_sample (embedded), npz:PATH or folder:PATH."
SPLITS = ("train", "validation", "test", "all")
# Per class, from the end of the file order: validation, then test before it.
_SAMPLE_HELD_OUT_PER_CLASS = {"validation": 100, "test": 100}
_VALIDATION_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes:
        images: (N, H, W, C) uint8, C in {1, 3}.
        labels: (N,) int32.
        num_classes: Number of classes of the dataset (not only of this split).
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int

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
            images, labels = _read_npz(str(p))
        return _split(images, labels, split, per_class=_SAMPLE_HELD_OUT_PER_CLASS, source=name)
    if name.startswith("npz:"):
        return _split(*_read_npz(name[4:]), split, source=name)
    if name.startswith("folder:"):
        return _split(*_read_folder(name[7:]), split, source=name)
    raise ValueError(
        f"unknown dataset {name!r}; use cifar10, cifar10_sample, npz:PATH or folder:PATH"
    )


def default_eval_split(name: str) -> str:
    """The split a user evaluating on dataset `name` means: all of a file or folder they
    pass, the held-out split of the named datasets."""
    return "all" if name.startswith(("npz:", "folder:")) else "validation"


def view_channels(view: str) -> int:
    """Input channels a model needs for `view`."""
    _check_view(view)
    return 1 if view == "gray" else 3


def apply_view(images: jax.Array, view: str) -> jax.Array:
    """Converts pixels to a view, keeping the 0-255 range.

    Args:
        images: (N, H, W, C) uint8 or float, C in {1, 3}.
        view: 'color' (C=3), 'gray' (BT.601 luma, 1 channel) or 'gray3' (luma on 3 channels).

    Returns:
        (N, H, W, 3 or 1) float32.
    """
    _check_view(view)
    x = jnp.asarray(images, jnp.float32)
    channels = x.shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {x.shape}")
    if view == "color":
        if channels != 3:
            raise ValueError(f"view 'color' needs 3-channel images, got shape {x.shape}")
        return x
    # dm-pix's rec601 weights (0.2989, 0.5870, 0.1140) are tf.image.rgb_to_grayscale's,
    # which the study used; luma is linear, so the 0-255 range needs no rescaling.
    gray = dm_pix.rgb_to_grayscale(x) if channels == 3 else x
    return jnp.repeat(gray, 3, axis=-1) if view == "gray3" else gray


def augment(rng: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """Random crop after `pad`-pixel zero padding, and random horizontal flip, per image.

    Args:
        rng: PRNG key.
        images: (N, H, W, C).

    Returns:
        (N, H, W, C), same dtype.
    """
    n, h, w, _ = images.shape
    crop_rng, flip_rng = jax.random.split(rng)
    offsets = jax.random.randint(crop_rng, (n, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_rng, 0.5, (n,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


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


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; views: {VIEWS}")


def _validate(images: np.ndarray, labels: np.ndarray, source: str) -> tuple[np.ndarray, ...]:
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{source}: images must be (N, H, W, C) with C 1 or 3, got shape {images.shape}"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8 0-255, got dtype {images.dtype}")
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"{source}: labels must be ({images.shape[0]},) to match images, got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
        raise ValueError(f"{source}: labels must be non-negative integers")
    return images, labels.astype(np.int32)


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise ValueError(f"npz dataset {path!r} does not exist")
    with np.load(path) as f:
        missing = {"images", "labels"} - set(f.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}; found {f.files}")
        return _validate(f["images"], f["labels"], path)


def _read_folder(path: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image  # Pillow comes with matplotlib.

    if not os.path.isdir(path):
        raise ValueError(f"folder dataset {path!r} is not a directory")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise ValueError(f"folder dataset {path!r} has no class subfolders")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(path, name))):
            file_path = os.path.join(path, name, file)
            try:
                with Image.open(file_path) as im:
                    images.append(np.asarray(im.convert("RGB")))
            except OSError as e:
                raise ValueError(f"{file_path}: not a readable image ({e})") from e
            labels.append(label)
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"{path}: images differ in shape {sorted(shapes)}; resize them first")
    return _validate(np.stack(images), np.asarray(labels), path)


def _split(
    images: np.ndarray,
    labels: np.ndarray,
    split: str,
    per_class: dict[str, int] | None = None,
    source: str = "",
) -> Split:
    """Class-balanced held-out splits taken from the end of each class, in file order.

    Args:
        per_class: {'validation': k, 'test': k}: the last k of each class are validation,
            the k before them test. None: the last 20% of each class are validation and
            there is no test split.
    """
    num_classes = int(labels.max()) + 1
    if split == "all":
        return Split(images, labels, num_classes)
    if split == "test" and not (per_class or {}).get("test"):
        raise ValueError(
            f"dataset {source!r} has no test split: pass held-out data as its own dataset "
            "(e.g. --eval_dataset=npz:PATH)"
        )
    part = np.full(len(labels), "train", dtype=object)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        end = len(idx)
        for name in ("validation", "test"):
            if per_class is None:
                k = int(round(len(idx) * _VALIDATION_FRACTION)) if name == "validation" else 0
            else:
                k = per_class.get(name, 0)
            k = min(k, end)
            part[idx[end - k : end]] = name
            end -= k
    keep = part == split
    return Split(images[keep], labels[keep], num_classes)


def _load_tfds_cifar10(split: str, data_dir: str | None) -> Split:
    import tensorflow_datasets as tfds

    tfds_split = {
        "train": "train[:90%]",
        "validation": "train[90%:]",
        "test": "test",
        "all": "train+test",
    }[split]
    # Batches of 10,000 rather than batch_size=-1: the latter aborts the process under
    # tfds.testing.mock_data (std::length_error), which the tests use.
    ds = tfds.load(
        "cifar10", split=tfds_split, batch_size=10_000, as_supervised=True, data_dir=data_dir
    )
    batches = list(tfds.as_numpy(ds))
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    images, labels = _validate(images, labels, "tfds:cifar10")
    return Split(images, labels, 10)
