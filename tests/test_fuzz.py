"""Fuzz (issue 14): seeded random malformed npz files, class folders and flag strings.

Every case must end in a correct result (checked against predictions computed here,
per image, and labels known from how the case was built) or in one `error: ...` line
naming what is wrong, within a time bound: never a traceback, a hang or a wrong number.
Datasets are fuzzed in-process through the library calls the CLIs make; flag strings run
through the real `experiments.evaluate`, `experiments.train` and `experiments.summary`
mains, one subprocess per command (`_DRIVER`), with the CLIs' own flag parsing and error
handling (`graycnn.cli.runtime`). Not fuzzed: compress (its validation is its own issue) and
`--distributed` (it joins a cluster).

GRAYCNN_FUZZ_SCALE=N multiplies the number of cases (default 1: ~50 s on 2 CPU cores).
"""

import io
import json
import os
import random
import subprocess
import sys
import time
import zipfile

import jax
import numpy as np
import pytest
from PIL import Image

from graycnn.layers import conv_layers
from graycnn.models import ModelConfig, build_model, count_params
from graycnn.training import checkpoint, data, evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CK = os.path.join(ROOT, "graycnn", "assets", "densenet_tiny_color")
SCALE = int(os.environ.get("GRAYCNN_FUZZ_SCALE", "1"))
SEED = 14
CASE_SECONDS = 30  # Generous: the machine is shared; a hang is minutes.


@pytest.fixture(scope="module")
def model():
    model_config, variables, _ = checkpoint.load_model(CK)
    return model_config, variables


@pytest.fixture(scope="module")
def pool(model):
    """30 validation images (3 per class), their labels and the model's predictions per
    view, computed here with one plain apply."""
    split = data.load_dataset("cifar10_sample", "validation")
    idx = np.concatenate([np.flatnonzero(split.labels == c)[:3] for c in range(10)])
    images, labels = split.images[idx], split.labels[idx]
    model_config, variables = model
    apply = jax.jit(lambda v, x: build_model(model_config).apply(v, x, train=False))
    predictions = {
        view: np.asarray(apply(variables, data.apply_view(images, view))).argmax(-1)
        for view in ("color", "gray3")
    }
    return images, labels, predictions


def _expected_accuracy(split, pool, view, label_of) -> float:
    """Accuracy from per-image predictions, each image found in the pool by its bytes,
    its true label given by `label_of(pool index)` (how the case was built)."""
    images, _, predictions = pool
    where = {im.tobytes(): i for i, im in enumerate(images)}
    idx = [where[im.tobytes()] for im in split.images]
    return float(np.mean([predictions[view][i] == label_of(i) for i in idx]))


def _check_error(e: Exception, *names: str) -> None:
    """An input error is one line that names the dataset (or the view at fault)."""
    message = str(e)
    assert "\n" not in message, message
    assert any(n in message for n in names), (names, message)


def _arrays(images, labels) -> dict[str, np.ndarray]:
    return {"images": images, "labels": labels}


def _last(labels, value, dtype=None):
    """`labels` with its last entry replaced by `value`."""
    return np.append(labels[:-1], value).astype(dtype or np.int64)


# Each npz case: name -> (valid, function of (images, labels, rng) -> arrays for
# np.savez, or the file's raw bytes).
_NPZ_CASES = {
    "none": (True, lambda im, lb, rng: _arrays(im, lb)),
    "extra_key": (True, lambda im, lb, rng: {**_arrays(im, lb), "extra": lb}),
    "labels_uint8": (True, lambda im, lb, rng: _arrays(im, lb.astype(np.uint8))),
    "labels_int64": (True, lambda im, lb, rng: _arrays(im, lb.astype(np.int64))),
    "gray_images": (False, lambda im, lb, rng: _arrays(im[..., :1], lb)),
    "images_float": (False, lambda im, lb, rng: _arrays(im.astype(np.float32), lb)),
    "images_int16": (False, lambda im, lb, rng: _arrays(im.astype(np.int16), lb)),
    "images_3d": (False, lambda im, lb, rng: _arrays(im[..., 0], lb)),
    "images_4ch": (False, lambda im, lb, rng: _arrays(np.concatenate([im, im[..., :1]], -1), lb)),
    "images_16px": (False, lambda im, lb, rng: _arrays(im[:, :16, :16], lb)),
    "images_0px": (False, lambda im, lb, rng: _arrays(im[:, :0], lb)),
    "no_images": (False, lambda im, lb, rng: _arrays(im[:0], lb[:0])),
    "labels_float": (False, lambda im, lb, rng: _arrays(im, lb + 0.5)),
    "labels_bool": (False, lambda im, lb, rng: _arrays(im, lb > 4)),
    "labels_str": (False, lambda im, lb, rng: _arrays(im, lb.astype(str))),
    "labels_object": (False, lambda im, lb, rng: _arrays(im, lb.astype(object))),
    "labels_negative": (False, lambda im, lb, rng: _arrays(im, lb - 1)),
    "labels_10": (False, lambda im, lb, rng: _arrays(im, _last(lb, 10))),
    "labels_1based": (False, lambda im, lb, rng: _arrays(im, _last(lb + 1, 10))),
    "labels_int32_max": (False, lambda im, lb, rng: _arrays(im, _last(lb, 2**31 - 1))),
    "labels_2_40": (False, lambda im, lb, rng: _arrays(im, _last(lb, 2**40))),
    "labels_uint64_max": (False, lambda im, lb, rng: _arrays(im, _last(lb, 2**64 - 1, np.uint64))),
    "labels_2d": (False, lambda im, lb, rng: _arrays(im, lb[:, None])),
    "labels_short": (False, lambda im, lb, rng: _arrays(im, lb[:-1])),
    "no_labels": (False, lambda im, lb, rng: {"images": im}),
    "renamed": (False, lambda im, lb, rng: {"x": im, "y": lb}),
    "npy": (False, lambda im, lb, rng: _npy_bytes(im)),
    "text": (False, lambda im, lb, rng: b"images,labels\n1,2\n"),
    "empty_file": (False, lambda im, lb, rng: b""),
    "random_bytes": (False, lambda im, lb, rng: rng.bytes(int(rng.integers(1, 5000)))),
    "truncated": (False, lambda im, lb, rng: _npz_bytes(im, lb)[: int(rng.integers(10, 3000))]),
    "bad_member": (False, lambda im, lb, rng: _zip_bytes({"images.npy": b"\x93NUMPY\x01junk"})),
}


def _npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npz_bytes(images, labels) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    return buffer.getvalue()


def _zip_bytes(members) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, content in members.items():
            z.writestr(name, content)
    return buffer.getvalue()


@pytest.mark.slow
def test_fuzz_npz_datasets(tmp_path, model, pool):
    images, labels, _ = pool
    rng = np.random.default_rng(SEED)
    names = sorted(_NPZ_CASES)
    for case in range(40 * SCALE):
        name = names[int(rng.integers(len(names)))]
        valid, make = _NPZ_CASES[name]
        n = int(rng.integers(1, len(images) + 1))
        idx = rng.choice(len(images), n, replace=False)
        content = make(images[idx], labels[idx], rng)
        path = tmp_path / f"case{case}_{name}.npz"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            np.savez(path, **content)
        split_name = ["all", "all", "train", "validation"][int(rng.integers(4))]
        view = ["color", "gray3", "gray"][int(rng.integers(3))]
        start = time.perf_counter()
        try:
            split = data.load_dataset(f"npz:{path}", split_name)
            result = evaluation.evaluate(*model, split, view, batch_size=8)
        except ValueError as e:
            # An empty split or a gray view (the model takes color) is a valid refusal.
            assert not valid or "no examples" in str(e) or view == "gray", (name, e)
            _check_error(e, str(path), "view 'gray'")
        else:
            assert valid and view != "gray", (name, result)
            expected = _expected_accuracy(split, pool, view, lambda i: labels[i])
            assert result["accuracy"] == pytest.approx(expected, abs=1e-9), name
            assert result["examples"] == len(split) and np.isfinite(result["loss"]), name
        assert time.perf_counter() - start < CASE_SECONDS, name


_FOLDER_NAMES = list(data.CIFAR10_CLASSES[:4]) + ["3", "7", "10", "class3", "Cat", ".hidden"]


def test_fuzz_folder_datasets(tmp_path, model, pool):
    images, _, _ = pool
    rng = random.Random(SEED)
    for case in range(15 * SCALE):
        root = tmp_path / f"case{case}"
        root.mkdir()
        names = rng.sample(_FOLDER_NAMES, rng.randint(1, 4))
        used = rng.sample(range(len(images)), len(names) * 3)
        valid, label_of_image = True, {}
        visible = [n for n in names if not n.startswith(".")]
        numbered = visible and all(n.isdigit() for n in visible)
        for name in names:
            folder = root / name
            folder.mkdir()
            hidden = name.startswith(".")
            picks = [used.pop() for _ in range(rng.randint(0, 3))]
            if not picks and not hidden:
                valid = False  # An empty class folder.
            label = (
                int(name)
                if numbered
                else data.CIFAR10_CLASSES.index(name)
                if name in data.CIFAR10_CLASSES
                else None
            )
            if not hidden and (label is None or label >= 10):
                valid = False  # Unknown to the model.
            for i in picks:
                mode = rng.choice(["RGB", "RGB", "RGBA"])
                Image.fromarray(images[i]).convert(mode).save(folder / f"{i}.png")
                label_of_image[i] = label
            junk = rng.choice([None, None, "hidden", "text", "corrupt", "small", "subdir"])
            if junk == "hidden":
                (folder / ".DS_Store").write_bytes(b"\x00\x01")  # Skipped: hidden.
            elif junk and not hidden:
                valid = False
                if junk == "text":
                    (folder / "notes.txt").write_text("not an image")
                elif junk == "corrupt":
                    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 50)
                elif junk == "small":
                    Image.fromarray(images[0][:16, :16]).save(folder / "small.png")
                else:
                    (folder / "nested").mkdir()
        if not visible:
            valid = False  # No class folders.
        view = rng.choice(["color", "gray3"])
        start = time.perf_counter()
        try:
            split = data.load_dataset(f"folder:{root}", "all")
            result = evaluation.evaluate(*model, split, view, batch_size=8)
        except ValueError as e:
            assert not valid, (names, e)
            _check_error(e, str(root))
        else:
            assert valid, (names, result)
            expected = _expected_accuracy(split, pool, view, label_of_image.__getitem__)
            assert result["accuracy"] == pytest.approx(expected, abs=1e-9), names
        assert time.perf_counter() - start < CASE_SECONDS, names


# The flag fuzz runs each command's real main in one subprocess, many times.
_DRIVER = r"""
import contextlib, importlib, io, json, sys, time, traceback
from absl import flags
from graycnn.cli import runtime

module = importlib.import_module(sys.argv[1])
results = []
for args in json.loads(sys.stdin.read()):
    flags.FLAGS.unparse_flags()
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main(runtime.parse_flags([sys.argv[1]] + args))
            rc = 0
        except SystemExit as e:  # parse_flags: the error line is printed.
            rc = e.code
        except runtime.INPUT_ERRORS as e:  # what runtime.run prints, exit status 2
            print(runtime.error_line(e), file=sys.stderr)
            rc = 2
        except BaseException:
            traceback.print_exc()
            rc = 1
    results.append({"args": args, "rc": rc, "stdout": out.getvalue(),
                    "stderr": err.getvalue(), "seconds": time.perf_counter() - start})
print(json.dumps(results))
"""


def _run_driver(module: str, cases: list[list[str]]) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-c", _DRIVER, module],
        input=json.dumps(cases),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60 + CASE_SECONDS * len(cases),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check_outcome(case: dict) -> str | None:
    """Returns the error line of a failed case (None on success), after checking it is
    the only one and that nothing else went wrong."""
    assert "Traceback" not in case["stderr"], case
    assert case["seconds"] < CASE_SECONDS, case
    if case["rc"] == 0:
        return None
    errors = [line for line in case["stderr"].splitlines() if line.startswith("error: ")]
    assert case["rc"] == 2 and len(errors) == 1, case
    return errors[0]


def _successes(module: str, cases: list[list[str]], valid: list[bool]):
    """Runs `cases` through `module`, checks each outcome against `valid` (both outcomes
    reached; a failure is one clean `error:` line), and yields (case, its flag settings)
    for the cases that succeeded, for the caller to check their results."""
    assert 0 < sum(valid) < len(valid), valid  # The fuzz reaches both outcomes.
    for case, ok in zip(_run_driver(module, cases), valid, strict=True):
        error = _check_outcome(case)
        assert (error is None) == ok, (case, error)
        if error is None:
            yield case, _settings(case["args"])


def _random_flags(rng: random.Random, choices: dict[str, list]) -> tuple[list[str], bool]:
    """Random `--flag=value` args from `choices` ({flag: [(value, valid), ...]}; a value
    None is the bare flag), and whether they are all valid. A third of the cases draw
    only valid values, so that both outcomes are reached."""
    bad_rate = rng.choice([0.0, 0.2, 0.6])
    args, valid = [], True
    for flag, values in choices.items():
        if rng.random() < 0.5:
            good = [v for v in values if v[1]]
            bad = [v for v in values if not v[1]]
            value, ok = rng.choice(bad if bad and rng.random() < bad_rate else good)
            args.append(f"--{flag}" if value is None else f"--{flag}={value}")
            valid &= ok
    if rng.random() < bad_rate / 4:
        args.append(rng.choice(["--bogus=1", "positional", "-x"]))
        valid = False
    return args, valid


def _with_default(args: list[str], flag: str, value: str) -> list[str]:
    return args if any(a.startswith(f"--{flag}") for a in args) else [*args, f"--{flag}={value}"]


def _settings(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if "=" in a)


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory, pool):
    images, labels, _ = pool
    root = tmp_path_factory.mktemp("fuzzflags")
    np.savez(root / "good.npz", images=images, labels=labels)
    np.savez(root / "labels10.npz", images=images, labels=labels + 1)
    (root / "text.npz").write_text("x")
    (root / "file").write_text("x")
    (root / "emptydir").mkdir()
    # Folder images are pool images under their true class names: labels are the pool's.
    for c in (3, 8):
        (root / "folder" / data.CIFAR10_CLASSES[c]).mkdir(parents=True)
        for i in np.flatnonzero(labels == c):
            Image.fromarray(images[i]).save(root / "folder" / data.CIFAR10_CLASSES[c] / f"{i}.png")
    return root


@pytest.mark.slow
def test_fuzz_evaluate_flags(fuzz_files, model, pool):
    f = fuzz_files
    rng = random.Random(SEED)
    good = f"npz:{f}/good.npz"
    choices = {
        "checkpoint": [(CK, True), (CK, True), (f / "missing", False), (f / "file", False),
                       (f / "emptydir", False), ("", False)],
        "dataset": [(good, True), (good, True), (f"folder:{f}/folder", True),
                    (f"npz:{f}/labels10.npz", False), (f"npz:{f}/text.npz", False),
                    ("npz:", False), ("folder:", False), ("imagenet", False),
                    (f"folder:{f}/file", False)],
        "split": [("all", True), ("validation", True), ("train", True), ("test", False)],
        "view": [("color", True), ("gray3", True), ("gray", False), ("grey", False)],
        "batch_size": [(8, True), (8, True), (0, False), (-3, False), ("x", False),
                       (2**40, True)],
    }  # fmt: skip
    cases, valid = [], []
    for _ in range(8 * SCALE):
        args, ok = _random_flags(rng, choices)
        ok &= any(a.startswith("--checkpoint") for a in args)  # Required.
        # cifar10_sample (the default) is slow to evaluate here: always give a dataset.
        cases.append(_with_default(args, "dataset", good))
        valid.append(ok)
    for case, settings in _successes("experiments.evaluate", cases, valid):
        report = json.loads(case["stdout"].strip().splitlines()[-1])
        split = data.load_dataset(settings["dataset"], settings.get("split", "all"))
        expected = _expected_accuracy(split, pool, report["view"], lambda i: pool[1][i])
        assert report["accuracy"] == pytest.approx(expected, abs=1e-9), case
        assert report["examples"] == len(split), case


@pytest.mark.slow
def test_fuzz_train_flags(fuzz_files, tmp_path):
    f = fuzz_files
    rng = random.Random(SEED + 1)
    (tmp_path / "afile").write_text("x")
    good = f"npz:{f}/good.npz"
    choices = {
        "model": [("resnet_test", True), ("resnet_test", True), ("vgg", False), ("", False)],
        "dataset": [(good, True), (good, True), (f"npz:{f}/text.npz", False),
                    ("cifar100", False)],
        "view": [("color", True), ("gray", True), ("gray3", True), ("rgb", False)],
        "epochs": [(1, True), (1, True), (0, False), (-2, False), ("one", False)],
        "batch_size": [(8, True), (8, True), (0, False), (10**6, False)],
        "learning_rate": [(0.01, True), ("nan", False), (-1, False), ("inf", False)],
        "momentum": [(0.9, True), ("-0.5", False)],
        "seed": [(0, True), (1, True), (-1, False), (2**40, False)],
        "augment": [(None, True), ("false", True), ("maybe", False)],
    }  # fmt: skip
    cases, valid = [], []
    for i in range(6 * SCALE):
        args, ok = _random_flags(rng, choices)
        # Every valid run must be a cheap one: the test model, one epoch.
        args = _with_default(_with_default(args, "model", "resnet_test"), "epochs", "1")
        args = _with_default(_with_default(args, "dataset", good), "batch_size", "8")
        workdir, writable = rng.choice(
            [(tmp_path / f"run{i}", True)] * 4
            + [(tmp_path / "afile", False), ("/sys/kernel/run", False)]
        )
        if rng.random() < 0.9:
            args.append(f"--workdir={workdir}")
            ok &= writable
        else:
            ok = False  # --workdir is required.
        cases.append(args)
        valid.append(ok)
    for case, settings in _successes("experiments.train", cases, valid):
        report = json.loads(case["stdout"].strip().splitlines()[-1])
        assert report["epoch"] == 1 and report["step"] >= 1, case
        model_config, _, config = checkpoint.load_model(settings["workdir"])
        assert config["train"]["model"] == model_config.name == settings["model"], case
        assert model_config.in_channels == data.view_channels(settings.get("view", "color"))


@pytest.mark.slow
def test_fuzz_summary_flags():
    rng = random.Random(SEED + 2)
    choices = {
        # Not densenet_seed: tracing it takes seconds, and it is the same code.
        "model": [("densenet_tiny", True), ("resnet20", True), ("nope", False)],
        "in_channels": [("1", True), ("3", True), ("2", False)],
        "widths": [("1:20,2:12", True), ("stem:5", True), ("0:4", False), ("1:0", False),
                   ("1:x", False), ("1:4,1:5", False), ("x:y:z", False), ("99:3", False),
                   ("7", False)],
        "num_classes": [(10, True), (2, True), (0, False), (-5, False), ("x", False)],
    }  # fmt: skip
    cases, valid = [], []
    for _ in range(10 * SCALE):
        args, ok = _random_flags(rng, choices)
        cases.append(_with_default(args, "model", "densenet_tiny"))
        valid.append(ok)
    for case, settings in _successes("experiments.summary", cases, valid):
        config = ModelConfig(
            settings["model"],
            in_channels=int(settings.get("in_channels", 3)),
            num_classes=int(settings.get("num_classes", 10)),
        )
        paths = conv_layers(build_model(config), config.input_shape)
        widths = {}
        for item in filter(None, settings.get("widths", "").split(",")):
            layer, width = item.split(":")
            widths[paths[int(layer) - 1] if layer.isdigit() else layer] = int(width)
        config = config.replace(widths=widths)
        shapes = jax.eval_shape(
            build_model(config).init, jax.random.key(0), jax.numpy.zeros(config.input_shape)
        )
        total = case["stdout"].strip().splitlines()[-1]
        assert total == f"total parameters: {count_params(shapes)}", case
