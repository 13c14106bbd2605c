"""Dataset files read to checked uint8 arrays: npz archives, folders of class subfolders,
and one image file (`read_image`: exact 0-255 pixels, or refused naming its mode).

Every dataset's arrays pass `check_arrays` (shapes, uint8 0-255 pixels, integer labels
below `MAX_CLASSES`). `graycnn.training.data` names these files (`npz:PATH`,
`folder:PATH`; its docstring gives the rules) and re-exports `read_image` and `MAX_CLASSES`.
"""

import os
import re
import zipfile
from collections.abc import Sequence

import numpy as np

# Labels are class indices, and a model gets one output per class: a label beyond this is
# a wrong file (an id, a hash), not a class, and would size a model head absurdly.
MAX_CLASSES = 100_000


def check_arrays(
    images: np.ndarray, labels: np.ndarray, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels as int32) of a dataset, or ValueError naming `source` and the fault."""
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
            f"got {few(np.unique(bad).tolist())}"
        )
    return images, labels.astype(np.int32)


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of an npz archive holding arrays `images` and `labels`, checked."""
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
    return check_arrays(images, labels, path)


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


def read_folder(path: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
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
            f"folder dataset {path!r}: image files {few(loose, 3)} sit directly in it; "
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
        raise ValueError(f"folder dataset {path!r}: class folders {few(empty)} hold no images")
    if len({im.shape[-1] for im in images}) > 1:
        # Gray and color images together: the gray ones become RGB, as Pillow's
        # convert("RGB") always made them.
        images = [np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in images]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"{path}: images differ in shape {sorted(shapes)}; resize them first")
    stacked, label_array = check_arrays(np.stack(images), np.asarray(labels), path)
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


def few(items: Sequence, limit: int = 10) -> str:
    """Up to `limit` items for an error message, and how many more."""
    items = list(items)
    shown = ", ".join(repr(x) if isinstance(x, str) else str(x) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _one_line(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
