"""Fuzz (issue 33): seeded random small image files in every mode a folder dataset meets.

Each case writes one random image (8- and 16-bit gray, bilevel, gray and color palettes
with and without transparency, gray + alpha, RGB, RGBA, 16-bit color PNGs written byte by
byte with random row filters, float and 32-bit TIFFs, EXIF-turned PNG, JPEG and TIFF
files) and asserts that `data.read_image` either gives the uint8 pixels computed here from
the values written (turned as the EXIF orientation says) or refuses the file in one line
naming the path and the mode (or orientation). Every fourth case also goes through a
folder dataset. GRAYCNN_FUZZ_SCALE=N multiplies the number of cases (default 1: ~2 s).
"""

import os
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from graycnn.training import data

SCALE = int(os.environ.get("GRAYCNN_FUZZ_SCALE", "1"))
SEED = 33

# Displayed pixels from stored ones, for each EXIF orientation (the EXIF 2.3 table).
_TURN = {
    1: lambda s: s,
    2: lambda s: s[:, ::-1],
    3: lambda s: s[::-1, ::-1],
    4: lambda s: s[::-1],
    5: lambda s: s.swapaxes(0, 1),
    6: lambda s: np.rot90(s, -1),
    7: lambda s: np.rot90(s.swapaxes(0, 1), 2),
    8: lambda s: np.rot90(s, 1),
}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _to_8bit(v: np.ndarray) -> np.ndarray:
    """The stated rule for 16-bit samples: round(v * 255 / 65535)."""
    return np.round(v.astype(np.float64) * 255 / 65535).astype(np.uint8)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _write_png16(path, samples: np.ndarray, color_type: int, rng, orientation=None) -> None:
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit color), each row with
    a random filter (PNG spec, section 9), with an eXIf chunk when `orientation` is set.

    Args:
        samples: (H, W, C) uint16, C = 1, 3, 2, 4 for color types 0, 2, 4, 6.
    """
    h, w, c = samples.shape
    bpp = 2 * c
    rows, prior = [], [0] * (w * bpp)
    for y in range(h):
        raw = list(samples[y].astype(">u2").tobytes())
        kind = rng.randrange(5)
        out = []
        for i, x in enumerate(raw):
            a = raw[i - bpp] if i >= bpp else 0
            b = prior[i]
            up_left = prior[i - bpp] if i >= bpp else 0
            guess = (0, a, b, (a + b) // 2, _paeth(a, b, up_left))[kind]
            out.append((x - guess) % 256)
        rows.append(bytes([kind, *out]))
        prior = raw

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    body = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
    if orientation is not None:
        exif = _exif(orientation).tobytes()
        body += chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif)
    body += chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _case(rng: random.Random, nrng: np.random.Generator, path):
    """Writes one random image file at `path` (suffix chosen here).

    Returns:
        (path written, expected (H, W, C) uint8 or None if it must be refused, what the
        refusal names).
    """
    h, w = rng.randint(1, 7), rng.randint(1, 7)
    kind = rng.choice(
        ["L8", "L16", "bilevel", "palette", "LA", "RGB", "RGBA", "float", "int32"]
        + ["png16_gray", "png16_rgb", "png16_rgba", "png16_la", "jpeg"]
    )
    orientation = rng.choice([1, 1, 2, 3, 4, 5, 6, 7, 8])
    u8 = nrng.integers(0, 256, (h, w), dtype=np.uint8)
    if kind.startswith("png16"):
        channels, color_type = {
            "png16_gray": (1, 0),
            "png16_rgb": (3, 2),
            "png16_rgba": (4, 6),
            "png16_la": (2, 4),
        }[kind]
        samples = nrng.integers(0, 65536, (h, w, channels), dtype=np.uint16)
        if rng.random() < 0.5:  # Also exact values k * 257.
            samples = samples // 257 * 257
        path = path.with_suffix(".png")
        _write_png16(path, samples, color_type, rng, orientation)
        kept = samples[..., :3] if channels >= 3 else samples[..., :1]
        return path, _TURN[orientation](_to_8bit(kept)), None
    if kind == "jpeg":
        pixels = nrng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(pixels if rng.random() < 0.5 else pixels[..., 0])
        path = path.with_suffix(".jpg")
        im.save(path, exif=_exif(orientation), quality=95)
        with Image.open(path) as stored:  # Pillow's JPEG decode, not turned.
            decoded = np.asarray(stored)
        decoded = decoded[..., None] if decoded.ndim == 2 else decoded
        return path, _TURN[orientation](decoded), None
    if kind == "float":
        path = path.with_suffix(".tif")
        Image.fromarray(nrng.random((h, w), dtype=np.float32)).save(path)
        return path, None, "image mode 'F'"
    if kind == "int32":
        path = path.with_suffix(".tif")
        Image.fromarray(nrng.integers(0, 2**20, (h, w), dtype=np.int32)).save(path)
        return path, None, "image mode 'I'"
    suffix = rng.choice(
        {"L8": [".png", ".bmp", ".tif"], "L16": [".png", ".tif"]}.get(
            kind, [".png", ".tif"] if kind in ("bilevel", "RGB", "RGBA", "palette") else [".png"]
        )
    )
    if kind == "L8":
        im, expected = Image.fromarray(u8), u8[..., None]
    elif kind == "L16":
        v = nrng.integers(0, 65536, (h, w), dtype=np.uint16)
        im, expected = Image.fromarray(v), _to_8bit(v)[..., None]
    elif kind == "bilevel":
        bits = nrng.integers(0, 2, (h, w)).astype(bool)
        im, expected = Image.fromarray(bits), (bits * np.uint8(255))[..., None]
    elif kind == "palette":
        colors = nrng.integers(0, 256, (256, 3), dtype=np.uint8)
        if rng.random() < 0.5:  # A gray palette: the image is gray.
            colors[:] = colors[:, :1]
        index = nrng.integers(0, 256, (h, w), dtype=np.uint8)
        im = Image.fromarray(index, "P")
        im.putpalette(colors.ravel().tolist())
        if rng.random() < 0.5:
            im.info["transparency"] = int(index[0, 0])  # Alpha: dropped.
        used = colors[index]
        gray = (used == used[..., :1]).all()
        expected = used[..., :1] if gray else used
    elif kind == "LA":
        la = nrng.integers(0, 256, (h, w, 2), dtype=np.uint8)
        im, expected = Image.fromarray(la, "LA"), la[..., :1]
    else:
        pixels = nrng.integers(0, 256, (h, w, len(kind)), dtype=np.uint8)
        im, expected = Image.fromarray(pixels, kind), pixels[..., :3]
    path = path.with_suffix(suffix)
    im.save(
        path,
        exif=_exif(orientation),
        **({"transparency": im.info["transparency"]} if "transparency" in im.info else {}),
    )
    if suffix == ".bmp":  # BMP has no EXIF.
        orientation = 1
    if suffix == ".tif" and orientation >= 5:
        return path, _TURN[orientation](expected), "TIFF orientation"  # Either is right.
    return path, _TURN[orientation](expected), None


def _check_refusal(e: ValueError, path, names: str) -> None:
    message = str(e)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: ") and names in message, (names, message)


def test_fuzz_image_files(tmp_path):
    rng = random.Random(SEED)
    nrng = np.random.default_rng(SEED)
    counts = {"loaded": 0, "refused": 0}
    for case in range(120 * SCALE):
        folder = tmp_path / str(case) / "cat"
        folder.mkdir(parents=True)
        path, expected, refusal = _case(rng, nrng, folder / "x")
        try:
            pixels = data.read_image(str(path))
        except ValueError as e:
            assert refusal, (path, e)
            _check_refusal(e, path, refusal)
            counts["refused"] += 1
            continue
        assert expected is not None, (path, pixels)
        assert pixels.dtype == np.uint8, path
        np.testing.assert_array_equal(pixels, expected, err_msg=str(path))
        counts["loaded"] += 1
        if case % 4 == 0:  # The same through a folder dataset.
            try:
                split = data.load_dataset(f"folder:{tmp_path / str(case)}", "all")
            except ValueError as e:  # A tiny image may hold only 0s and 1s.
                assert expected.max() == 1, (path, e)
                assert "like 0/1 masks" in str(e), e
            else:
                np.testing.assert_array_equal(split.images[0], expected, err_msg=str(path))
    # The draw covers both outcomes.
    assert counts["loaded"] > 60 and counts["refused"] > 5, counts


@pytest.mark.parametrize("orientation", range(1, 9))
def test_turns_of_a_16bit_rgb_png(tmp_path, orientation):
    """Every orientation on the 16-bit color path, which turns without exif_transpose."""
    samples = np.random.default_rng(orientation).integers(0, 65536, (2, 3, 3), dtype=np.uint16)
    _write_png16(tmp_path / "x.png", samples, 2, random.Random(orientation), orientation)
    np.testing.assert_array_equal(
        data.read_image(str(tmp_path / "x.png")), _TURN[orientation](_to_8bit(samples))
    )
