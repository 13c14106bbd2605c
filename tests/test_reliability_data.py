"""Dataset reading (issue 33): every image mode decodes to the right 0-255 pixels or is
refused naming the path and mode; 0/1 masks and images beside the class folders are
refused, not scored. References are computed here from the pixel values written."""

import os

import numpy as np
import pytest
from PIL import Image

from graycnn.training import checkpoint, data, evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CK = os.path.join(ROOT, "graycnn", "assets", "densenet_tiny_color")


def _gray_images(n: int = 4, shape=(6, 5), seed: int = 0) -> np.ndarray:
    """(n, H, W) uint8 gray images that use 0 and 255 too."""
    images = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    return images


def _gray_palette(v: np.ndarray) -> Image.Image:
    """`v` as a palette image whose entry i is the gray (i, i, i)."""
    im = Image.fromarray(v, "P")
    im.putpalette([c for i in range(256) for c in (i, i, i)])
    return im


# Each writes one gray image v (H, W) uint8 in another lossless format.
_FORMATS = {
    "png8": lambda v, p: Image.fromarray(v).save(p / "x.png"),
    "png16": lambda v, p: Image.fromarray(v.astype(np.uint16) * 257).save(p / "x.png"),
    "bmp": lambda v, p: Image.fromarray(v).save(p / "x.bmp"),
    "tiff8": lambda v, p: Image.fromarray(v).save(p / "x.tif"),
    "tiff16": lambda v, p: Image.fromarray(v.astype(np.uint16) * 257).save(p / "x.tif"),
    "tiff16_big_endian": lambda v, p: Image.fromarray(
        (v.astype(np.uint16) * 257).astype(">u2")
    ).save(p / "x.tif"),
    "palette_png": lambda v, p: _gray_palette(v).save(p / "x.png"),
    "gray_alpha_png": lambda v, p: Image.fromarray(np.stack([v, 255 - v], -1), "LA").save(
        p / "x.png"
    ),
}


def _write_folder(root, images, write) -> str:
    """A folder dataset of two classes ('cat', 'dog'), image i in class i % 2."""
    for i, v in enumerate(images):
        folder = root / ("cat", "dog")[i % 2] / f"{i:02d}"
        folder.mkdir(parents=True)
        write(v, folder)
        (name,) = os.listdir(folder)
        os.rename(folder / name, root / ("cat", "dog")[i % 2] / f"{i:02d}_{name}")
        folder.rmdir()
    return f"folder:{root}"


def test_the_same_gray_image_loads_the_same_in_every_lossless_format(tmp_path):
    images = _gray_images()
    # The expected folder: class 'cat' holds images 0, 2; 'dog' 1, 3 (sorted file names).
    order = [0, 2, 1, 3]
    expected = images[order][..., None]
    for name, write in _FORMATS.items():
        split = data.load_dataset(_write_folder(tmp_path / name, images, write), "all")
        assert split.images.dtype == np.uint8, name
        np.testing.assert_array_equal(split.images, expected, err_msg=name)
        assert split.labels.tolist() == [0, 0, 1, 1], name


def test_16bit_gray_scales_exactly_by_rounding(tmp_path):
    v = np.random.default_rng(1).integers(0, 65536, (7, 9), dtype=np.uint16)
    v[0, :4] = [0, 65535, 128, 129]  # 128 / 257 rounds down, 129 / 257 up.
    expected = np.round(v.astype(np.float64) * 255 / 65535).astype(np.uint8)
    for suffix in ("png", "tif"):
        Image.fromarray(v).save(tmp_path / f"x.{suffix}")
        pixels = data.read_image(str(tmp_path / f"x.{suffix}"))
        np.testing.assert_array_equal(pixels, expected[..., None], err_msg=suffix)
    # A 16-bit PGM (Pillow's mode 'I') reads the same.
    (tmp_path / "x.pgm").write_bytes(b"P5 9 7 65535\n" + v.astype(">u2").tobytes())
    np.testing.assert_array_equal(data.read_image(str(tmp_path / "x.pgm")), expected[..., None])


def test_16bit_gray_folder_scores_as_its_8bit_pixels(tmp_path):
    """A folder of 16-bit gray PNGs (values * 257), loaded and evaluated as
    `experiments.evaluate` does, scores what the model scores on the 8-bit gray pixels
    given in memory (the CLI run is a row of docs/hostile_input.md)."""
    split = data.load_dataset("cifar10_sample", "validation")
    idx = np.concatenate([np.flatnonzero(split.labels == c)[:5] for c in (3, 5)])
    gray = np.round(split.images[idx].astype(np.float64) @ [0.2989, 0.587, 0.114])
    gray = gray.astype(np.uint8)
    for i, (v, c) in enumerate(zip(gray, split.labels[idx], strict=True)):
        folder = tmp_path / data.CIFAR10_CLASSES[c]
        folder.mkdir(exist_ok=True)
        Image.fromarray(v.astype(np.uint16) * 257).save(folder / f"{i:02d}.png")
    model_config, variables, _ = checkpoint.load_model(CK)
    folder_split = data.load_dataset(f"folder:{tmp_path}", "all")
    result = evaluation.evaluate(model_config, variables, folder_split, "gray3", batch_size=16)
    reference = data.Split(gray[..., None], split.labels[idx], 10, data.CIFAR10_CLASSES, "memory")
    expected = evaluation.evaluate(model_config, variables, reference, "gray3", batch_size=16)
    assert result["examples"] == expected["examples"] == 10
    assert result["accuracy"] == expected["accuracy"]
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert 0 < expected["accuracy"] < 1  # Some right, some wrong: the score tells.


def test_exif_orientation_is_applied(tmp_path):
    # A 4 x 2 image, top half dark, stored with orientation 6 (display: turn 90 degrees
    # clockwise), so the displayed 2 x 4 image is dark on the right.
    stored = np.zeros((8, 16), np.uint8)
    stored[4:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    for suffix in ("jpg", "png"):
        Image.fromarray(stored).save(tmp_path / f"x.{suffix}", exif=exif)
        pixels = data.read_image(str(tmp_path / f"x.{suffix}"))[..., 0].astype(int)
        assert pixels.shape == (16, 8), suffix
        assert pixels[:, 4:].max() < 20 and pixels[:, :4].min() > 235, suffix  # JPEG: near.
    np.testing.assert_array_equal(
        data.read_image(str(tmp_path / "x.png"))[..., 0], stored.T[:, ::-1]
    )


def test_bilevel_palette_and_alpha_images(tmp_path):
    bits = np.random.default_rng(2).integers(0, 2, (5, 6)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "bits.png")
    Image.fromarray(bits).save(tmp_path / "bits.bmp")
    for name in ("bits.png", "bits.bmp"):
        np.testing.assert_array_equal(
            data.read_image(str(tmp_path / name))[..., 0], bits * np.uint8(255), err_msg=name
        )
    # A color palette with a transparent entry: palette colors, alpha dropped, as RGBA's.
    index = np.array([[0, 1], [2, 3]], np.uint8)
    palette = np.array([[0, 0, 0], [10, 20, 30], [200, 200, 200], [255, 0, 0]], np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(palette.ravel().tolist())
    im.info["transparency"] = 1
    im.save(tmp_path / "p.png", transparency=1)
    np.testing.assert_array_equal(data.read_image(str(tmp_path / "p.png")), palette[index])
    rgba = np.random.default_rng(3).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(data.read_image(str(tmp_path / "rgba.png")), rgba[..., :3])


def test_gray_and_color_in_one_folder_are_all_rgb(tmp_path):
    gray = _gray_images(1)[0]
    color = np.random.default_rng(4).integers(0, 256, (*gray.shape, 3), dtype=np.uint8)
    (tmp_path / "cat").mkdir()
    Image.fromarray(gray).save(tmp_path / "cat" / "a.png")
    Image.fromarray(color).save(tmp_path / "cat" / "b.png")
    split = data.load_dataset(f"folder:{tmp_path}", "all")
    np.testing.assert_array_equal(split.images, np.stack([np.stack([gray] * 3, -1), color]))


@pytest.mark.parametrize(
    "write, message",
    [
        (
            lambda p: Image.fromarray(np.full((3, 4), 0.5, np.float32)).save(p),
            r"float pixels \(image mode 'F'\) have no fixed 0-255 range",
        ),
        (
            lambda p: Image.fromarray(np.full((3, 4), 70000, np.int32)).save(p),
            r"32-bit integer pixels \(image mode 'I', I;32S\) have no fixed 0-255 range",
        ),
    ],
)
def test_float_and_32bit_tiffs_are_refused_by_mode(tmp_path, write, message):
    (tmp_path / "cat").mkdir()
    Image.fromarray(_gray_images(1, (3, 4))[0]).save(tmp_path / "cat" / "a.tif")
    path = tmp_path / "cat" / "b.tif"
    write(path)
    with pytest.raises(ValueError, match=rf"^{path}: {message}") as e:
        data.load_dataset(f"folder:{tmp_path}", "all")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("suffix", [".tif", ".gif"])
def test_multi_frame_files_are_refused(tmp_path, suffix):
    frames = [Image.fromarray(im) for im in _gray_images(3, (4, 4))]
    path = tmp_path / f"stack{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with Image.open(path) as im:
        assert im.n_frames == 3  # the file really is a stack
    with pytest.raises(ValueError, match=rf"^{path}: holds 3 frames \((TIFF|GIF)\); a dataset"):
        data.read_image(str(path))
    frames[0].save(tmp_path / f"one{suffix}")  # one frame: read as before
    np.testing.assert_array_equal(
        data.read_image(str(tmp_path / f"one{suffix}"))[..., 0], frames[0]
    )


def test_quarter_turned_tiff_is_read_turned_or_refused(tmp_path):
    stored = _gray_images(1, (3, 4))[0]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "x.tif", exif=exif)
    try:
        pixels = data.read_image(str(tmp_path / "x.tif"))
    except ValueError as e:
        assert str(e) == (
            f"{tmp_path / 'x.tif'}: TIFF orientation 6 (a quarter turn) is misread by this "
            "Pillow; save the image upright (orientation 1)"
        )
    else:
        np.testing.assert_array_equal(pixels[..., 0], np.rot90(stored, -1))


def test_0_1_masks_are_refused(tmp_path):
    masks = _gray_images() % 2
    np.savez(tmp_path / "m.npz", images=masks[..., None], labels=np.array([0, 1, 0, 1]))
    message = "images hold only the values 0 and 1, like 0/1 masks; models take 0-255 pixels"
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'm.npz'}: {message}"):
        data.load_dataset(f"npz:{tmp_path / 'm.npz'}", "all")
    _write_folder(tmp_path / "f", masks, _FORMATS["png8"])
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'f'}: {message}"):
        data.load_dataset(f"folder:{tmp_path / 'f'}", "all")
    # The same masks as bilevel images are 0/255 pixels, and load.
    _write_folder(
        tmp_path / "b", masks.astype(bool), lambda v, p: Image.fromarray(v).save(p / "x.png")
    )
    assert set(np.unique(data.load_dataset(f"folder:{tmp_path / 'b'}", "all").images)) == {0, 255}


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int64, np.int8])
def test_npz_images_of_another_dtype_are_refused(tmp_path, dtype):
    images = (_gray_images()[..., None] / 255).astype(dtype)
    np.savez(tmp_path / "x.npz", images=images, labels=np.arange(4))
    with pytest.raises(
        ValueError, match=rf"images must be uint8 0-255, got dtype {np.dtype(dtype).name}"
    ):
        data.load_dataset(f"npz:{tmp_path / 'x.npz'}", "all")


def test_loose_images_beside_class_folders_are_refused(tmp_path):
    _write_folder(tmp_path, _gray_images(), _FORMATS["png8"])
    (tmp_path / "README.txt").write_text("scans of 2026\n")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")
    assert len(data.load_dataset(f"folder:{tmp_path}", "all")) == 4  # Skipped, both.
    for name in ("z.png", "a.jpg", "b.tif", "c.bmp"):
        Image.fromarray(_gray_images(1)[0]).save(tmp_path / name)
    with pytest.raises(ValueError) as e:
        data.load_dataset(f"folder:{tmp_path}", "all")
    assert str(e.value) == (
        f"folder dataset {str(tmp_path)!r}: image files 'a.jpg', 'b.tif', 'c.bmp' and 1 more "
        "sit directly in it; images must sit in class subfolders (one per class)"
    )
    # An image without an image suffix is still an image.
    for name in ("z.png", "a.jpg", "b.tif", "c.bmp"):
        os.remove(tmp_path / name)
    Image.fromarray(_gray_images(1)[0]).save(tmp_path / "scan.dat", format="PNG")
    with pytest.raises(ValueError, match=r"image files 'scan.dat' sit directly in it"):
        data.load_dataset(f"folder:{tmp_path}", "all")


def test_cmyk_converts_and_lab_is_refused_by_mode(tmp_path):
    cmyk = np.random.default_rng(5).integers(0, 256, (4, 5, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "x.tif")
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = np.round((255 - c) * (255 - k) / 255)  # The usual CMYK -> RGB.
    pixels = data.read_image(str(tmp_path / "x.tif"))
    assert pixels.shape == (4, 5, 3)
    assert np.abs(pixels - expected).max() <= 1  # Pillow's integer rounding.
    Image.new("LAB", (3, 2), (50, 10, 20)).save(tmp_path / "lab.tif")
    with pytest.raises(ValueError) as e:
        data.read_image(str(tmp_path / "lab.tif"))
    assert str(e.value) == (
        f"{tmp_path / 'lab.tif'}: image mode 'LAB' has no 0-255 pixel meaning here; save the "
        "image as 8-bit gray (L) or RGB"
    )
