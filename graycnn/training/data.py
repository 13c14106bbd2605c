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
"""

import dataclasses
import importlib.resources
import os
import re
import socket
import zipfile
from collections.abc import Iterator, Sequence

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

VIEWS = ("color", "gray", "gray3")
DATASET_HELP = "cifar10, cifar10_sample (embedded), npz:PATH or folder:PATH."
SPLITS = ("train", "validation", "test", "all")
# Per class, from the end of the file order: validation, then test before it.
_SAMPLE_HELD_OUT_PER_CLASS = {"validation": 100, "test": 100}
_VALIDATION_FRACTION = 0.2
# Labels are class indices, and a model gets one output per class: a label beyond this is
# a wrong file (an id, a hash), not a class, and would size a model head absurdly.
MAX_CLASSES = 100_000
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
_NAMED = {"cifar10": CIFAR10_CLASSES, "cifar10_sample": CIFAR10_CLASSES}
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
            images, labels = _read_npz(str(p))
        return _split(
            images, labels, split, name, CIFAR10_CLASSES, per_class=_SAMPLE_HELD_OUT_PER_CLASS
        )
    if name.startswith("npz:"):
        return _split(*_read_npz(name[4:]), split, name)
    if name.startswith("folder:"):
        images, labels, class_names = _read_folder(name[7:])
        return _split(images, labels, split, name, class_names)
    raise ValueError(
        f"unknown dataset {name!r}; use cifar10, cifar10_sample, npz:PATH or folder:PATH"
    )


def known_class_names(name: str) -> tuple[str, ...] | None:
    """The class names of a named dataset (cifar10, cifar10_sample), else None."""
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
                    f"{split.source}: classes {_few(unknown)} are unknown to the model, whose "
                    f"classes are {', '.join(class_names)}; name the class folders after "
                    f"those, or by class index 0..{num_classes - 1}"
                )
            table = np.array([class_names.index(n) for n in split.class_names], np.int32)
            labels = table[labels]
        elif len(split.class_names) != num_classes:
            raise ValueError(
                f"{split.source}: {len(split.class_names)} classes "
                f"({_few(split.class_names)}) but the model has {num_classes} unnamed classes; "
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
            f"{split.source}: labels {_few(bad.tolist())} ({np.isin(labels, bad).sum()} "
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


def view_channels(view: str) -> int:
    """Input channels a model needs for `view`."""
    _check_view(view)
    return 1 if view == "gray" else 3


def apply_view(images: ArrayLike, view: str) -> jax.Array:
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


def _validate(images: np.ndarray, labels: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{source}: images must be (N, H, W, C) with C 1 or 3, got shape {images.shape}"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8 0-255, got dtype {images.dtype}")
    if images.size and images.max() == 1:
        raise ValueError(
            f"{source}: images hold only the values 0 and 1, like 0/1 masks; models take "
            "0-255 pixels (multiply the images by 255)"
        )
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"{source}: labels must be ({images.shape[0]},) to match images, got {labels.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{source}: holds no images (images has shape {images.shape})")
    if min(images.shape[1:3]) < 1:
        raise ValueError(f"{source}: images are empty, shape {images.shape}")
    # bool is not an np.integer: True/False labels are refused here too.
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integer class indices, got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= MAX_CLASSES:
        bad = labels[(labels < 0) | (labels >= MAX_CLASSES)]
        raise ValueError(
            f"{source}: labels must be class indices 0..K-1 with K <= {MAX_CLASSES:,}; "
            f"got {_few(np.unique(bad).tolist())}"
        )
    return images, labels.astype(np.int32)


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.exists(path):
        raise ValueError(f"npz dataset {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"npz dataset {path!r} is a directory (a folder dataset is folder:PATH)")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            is_npy = f.read(6) == b"\x93NUMPY"
        what = "a single .npy array" if is_npy else "not an npz archive (or a truncated one)"
        raise ValueError(
            f"{path}: {what}; write the dataset with np.savez(path, images=..., labels=...)"
        )
    try:
        # Pickles are refused: a dataset file must not run code.
        with np.load(path, allow_pickle=False) as f:
            missing = {"images", "labels"} - set(f.files)
            if not missing:
                images, labels = f["images"], f["labels"]
            files = f.files
    except Exception as e:  # numpy raises many types for damaged archives.
        raise ValueError(f"{path}: cannot read the npz archive ({_one_line(e)})") from e
    if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)}; found {files}")
    return _validate(images, labels, path)


def read_image(path: str) -> np.ndarray:
    """Decodes one image file to 0-255 pixels, or refuses it naming the path and mode.

    Every mode Pillow reads is mapped exactly or refused, never clipped or guessed: the
    EXIF orientation is applied first; gray modes ('1' as 0/255, 'L', 'LA', 16-bit
    'I;16*', and 'I' when the file says it holds 16-bit samples) give one channel; color
    modes ('RGB', 'RGBA', 'RGBX', 'CMYK', 'YCbCr', 16-bit RGB(A)) give three. A palette
    image ('P', 'PA') goes through its palette, and is gray when every color it uses is.
    Alpha is dropped (pixels keep their color, as before; a palette's transparency is
    alpha too). 16-bit samples v become round(v * 255 / 65535), so v = 257 * k gives k.
    Refused: 'F' (float: no fixed range), 'I' from a 32-bit file, modes without a
    0-255 meaning ('LAB', 'HSV', premultiplied 'La', 'RGBa'), and files of several frames
    (a TIFF stack, an animated GIF; a camera JPEG's preview frame is not counted).

    Args:
        path: An image file.

    Returns:
        (H, W, 1) uint8 for a gray image, (H, W, 3) uint8 for a color one.

    Raises:
        ValueError: one line naming `path` (and the mode, for a refused mode).
    """
    from PIL import Image  # Pillow comes with matplotlib.

    try:
        with Image.open(path) as im:
            return _decode(im, path)
    except _RefusedImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: not a readable image ({_one_line(e)})") from e


class _RefusedImage(ValueError):
    """A readable image whose pixels have no honest 0-255 meaning."""


def _decode(im, path: str) -> np.ndarray:
    """`read_image` of an open image `im`: refusals first, then orientation, then pixels."""
    from PIL import ImageOps

    mode = im.mode
    # A stack (a multi-page TIFF, an animated GIF) is several images, one of which would
    # be kept silently. A camera's JPEG (MPO) holds a preview frame after the photo.
    if getattr(im, "n_frames", 1) > 1 and im.format not in ("MPO", "JPEG"):
        raise _RefusedImage(
            f"{path}: holds {im.n_frames} frames ({im.format}); a dataset image is one "
            "frame: save each frame as its own file"
        )
    rawmodes = [_rawmode(t.args) for t in im.tile]
    # Pillow reads 16-bit samples of these modes as their high byte (floor(v / 256)).
    cut_to_8bit = mode not in ("I", *_UNSIGNED_16) and any(";16" in r for r in rawmodes)
    if mode == "F":
        raise _RefusedImage(
            f"{path}: float pixels (image mode 'F') have no fixed 0-255 range, so they are "
            "not guessed; save the image as 8- or 16-bit integers (e.g. round(x * 255) for "
            "values in 0..1)"
        )
    if mode == "I" and not (
        im.format == "PPM" or (rawmodes and all(r in _UNSIGNED_16 for r in rawmodes))
    ):
        # Pillow's PPM reader scales every maxval to 0..65535; others give 'I' for 32-bit.
        raise _RefusedImage(
            f"{path}: 32-bit integer pixels (image mode 'I', {', '.join(rawmodes)}) have no "
            "fixed 0-255 range, so they are not guessed; save the image as 8- or 16-bit"
        )
    if mode not in _MODES:
        raise _RefusedImage(
            f"{path}: image mode {mode!r} has no 0-255 pixel meaning here; save the image as "
            "8-bit gray (L) or RGB"
        )
    # Pillow turns a TIFF by its orientation tag itself, on load (and drops the tag); its
    # quarter turns (5-8) of a non-square image come out unturned and scrambled in Pillow
    # 13, so they are refused unless the loaded size shows the turn.
    turn = im.tag_v2.get(_ORIENTATION) if im.format == "TIFF" else None
    upright_size = im.size  # For 5-8, Pillow gives the turned size before loading.
    im.load()
    if turn in (5, 6, 7, 8) and im.size != upright_size:
        raise _RefusedImage(
            f"{path}: TIFF orientation {turn} (a quarter turn) is misread by this Pillow; "
            "save the image upright (orientation 1)"
        )
    if cut_to_8bit:
        return _orient(_sixteen_bit(path, mode, rawmodes), im)
    # Orientation before anything else, in the image's own mode (a transpose only).
    im = ImageOps.exif_transpose(im)
    if mode == "I" or mode in _UNSIGNED_16:
        return _from_16bit(np.asarray(im).astype(np.int64))[..., None]
    if mode in ("1", "L", "LA"):
        return np.asarray(im.convert("L"))[..., None]
    rgb = np.asarray(im.convert("RGB"))
    if mode in ("P", "PA") and (rgb == rgb[..., :1]).all():
        return rgb[..., :1]
    return rgb


_ORIENTATION = 0x0112  # The EXIF (and TIFF) orientation tag.
# Modes mapped to 0-255 by `_decode` (besides 16-bit color, handled on its own).
_MODES: tuple[str, ...] = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I")
_UNSIGNED_16 = ("I;16", "I;16B", "I;16L", "I;16N")
_MODES += _UNSIGNED_16


def _from_16bit(v: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535) = round(v / 257) in integers (v / 257 is never a half)."""
    if v.min() < 0 or v.max() > 65535:
        raise ValueError(f"16-bit samples out of 0..65535: {v.min()}..{v.max()}")
    return ((2 * v + 257) // 514).astype(np.uint8)


def _rawmode(args) -> str:
    """The rawmode in a Pillow tile's decoder arguments ('' if it names none)."""
    if isinstance(args, tuple) and args:
        args = args[0]
    return args if isinstance(args, str) else ""


def _sixteen_bit(path: str, mode: str, rawmodes: list[str]) -> np.ndarray:
    """Exact 0-255 pixels (H, W, 1 or 3) of a 16-bit image that Pillow cuts to 8 bits,
    from two decodes of the same tiles: Pillow's own rawmode gives the high bytes, its
    other-endian twin the low bytes (a 16-bit gray + alpha PNG: both, as 'RGBA')."""
    from PIL import Image

    def decode(rawmode_of) -> np.ndarray:
        with Image.open(path) as again:
            again.tile = [
                t._replace(
                    args=rawmode_of(t.args)
                    if isinstance(t.args, str)
                    # Pillow types a tile's args as optional; a decoder tile has them.
                    else (rawmode_of(t.args[0]), *t.args[1:])  # type: ignore[index]
                )
                for t in again.tile
            ]
            again.load()
            return np.asarray(again).astype(np.int64)

    try:
        if all(r == "LA;16B" for r in rawmodes):
            # As 'RGBA' bytes: gray high, gray low, alpha high, alpha low.
            both = decode(lambda r: "RGBA")
            return _from_16bit(both[..., :1] * 256 + both[..., 1:2])
        if mode in ("L", "LA", "RGB", "RGBA") and all(r[-4:] in (";16B", ";16L") for r in rawmodes):
            twin = {"B": "L", "L": "B"}
            high = np.atleast_3d(decode(lambda r: r))
            low = np.atleast_3d(decode(lambda r: r[:-1] + twin[r[-1]]))
            keep = 3 if mode.startswith("RGB") else 1
            return _from_16bit(high[..., :keep] * 256 + low[..., :keep])
    except (OSError, ValueError) as e:
        reason = _one_line(e)
    else:
        reason = "no exact decoder"
    raise _RefusedImage(
        f"{path}: 16-bit image (mode {mode!r}, {', '.join(rawmodes)}) cannot be read exactly "
        f"({reason}); save it as a 16-bit PNG or as 8-bit"
    )


def _orient(pixels: np.ndarray, im) -> np.ndarray:
    """`pixels` (H, W, C) turned as `im`'s EXIF orientation says (what exif_transpose does)."""
    from PIL import Image

    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(im.getexif().get(_ORIENTATION))
    if method is None:
        return pixels
    channels = [Image.fromarray(pixels[..., c]).transpose(method) for c in range(pixels.shape[-1])]
    return np.stack([np.asarray(c) for c in channels], axis=-1)


def _read_folder(path: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """Returns (images, labels, class names or None when every subfolder is a number).

    Images are (N, H, W, 1) when every image is gray, else (N, H, W, 3) with gray images
    repeated on three channels (`read_image` decodes each).
    """
    from PIL import Image  # Pillow comes with matplotlib.

    if not os.path.isdir(path):
        raise ValueError(f"folder dataset {path!r} is not a directory")
    entries = sorted(d for d in os.listdir(path) if not d.startswith("."))
    classes = [d for d in entries if os.path.isdir(os.path.join(path, d))]
    # Images beside the class folders belong to no class: refused, not dropped. Other
    # files (a README, a labels.csv) are skipped.
    loose = [
        f for f in entries if f not in classes and _looks_like_image(os.path.join(path, f), Image)
    ]
    if loose:
        raise ValueError(
            f"folder dataset {path!r}: image files {_few(loose, 3)} sit directly in it; "
            "images must sit in class subfolders (one per class)"
        )
    if not classes:
        raise ValueError(f"folder dataset {path!r} has no class subfolders")
    numbered = all(re.fullmatch(r"[0-9]{1,9}", name) for name in classes)
    images, labels, empty = [], [], []
    for position, name in enumerate(classes):
        # Subfolders named by numbers hold those class indices, not sorted positions
        # ("10" sorts before "2").
        label = int(name) if numbered else position
        files = sorted(f for f in os.listdir(os.path.join(path, name)) if not f.startswith("."))
        if not files:
            empty.append(name)
        for file in files:
            images.append(read_image(os.path.join(path, name, file)))
            labels.append(label)
    if empty:
        raise ValueError(f"folder dataset {path!r}: class folders {_few(empty)} hold no images")
    if len({im.shape[-1] for im in images}) > 1:
        # Gray and color images together: the gray ones become RGB, as Pillow's
        # convert("RGB") always made them.
        images = [np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in images]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"{path}: images differ in shape {sorted(shapes)}; resize them first")
    stacked, label_array = _validate(np.stack(images), np.asarray(labels), path)
    return stacked, label_array, None if numbered else tuple(classes)


def _looks_like_image(path: str, image_module) -> bool:
    """Whether a file is an image: a Pillow image extension, or Pillow can open it."""
    if not os.path.isfile(path):
        return False
    if os.path.splitext(path)[1].lower() in image_module.registered_extensions():
        return True
    try:
        with image_module.open(path):
            return True
    except Exception:  # Any failure to identify it means: not an image.
        return False


def _split(
    images: np.ndarray,
    labels: np.ndarray,
    split: str,
    source: str,
    class_names: tuple[str, ...] | None = None,
    per_class: dict[str, int] | None = None,
) -> Split:
    """Class-balanced held-out splits taken from the end of each class, in file order.

    Args:
        per_class: {'validation': k, 'test': k}: the last k of each class are validation,
            the k before them test. None: the last 20% of each class are validation and
            there is no test split.
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
        for name in ("validation", "test"):
            if per_class is None:
                k = int(round(len(idx) * _VALIDATION_FRACTION)) if name == "validation" else 0
            else:
                k = per_class.get(name, 0)
            k = min(k, end)
            part[idx[end - k : end]] = name
            end -= k
    keep = part == split
    return Split(images[keep], labels[keep], num_classes, class_names, source)


def _few(items: Sequence, limit: int = 10) -> str:
    """Up to `limit` items for an error message, and how many more."""
    items = list(items)
    shown = ", ".join(repr(x) if isinstance(x, str) else str(x) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _one_line(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    images, labels = _validate(images, labels, "tfds:cifar10")
    return Split(images, labels, 10, CIFAR10_CLASSES, "cifar10")
