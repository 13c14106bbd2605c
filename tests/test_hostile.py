"""Hostile input (issue 14): every bad input is one clear error naming the flag, path,
label or layer at fault, before long work; a valid one gives the right number.
docs/hostile_input.md lists each case with the message the user sees."""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import jax
import numpy as np
import pytest
from PIL import Image

from graycnn import distance, merge
from graycnn.layers import resolve_layer
from graycnn.models import ModelConfig, build_model, init_variables
from graycnn.training import checkpoint, data, evaluation, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CK = os.path.join(ROOT, "graycnn", "assets", "densenet_tiny_color")


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's one error line, after checking there is exactly one and no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def shipped():
    """The shipped CIFAR-10 model: (model config, variables)."""
    model_config, variables, _ = checkpoint.load_model(CK)
    return model_config, variables


@pytest.fixture(scope="module")
def val_images():
    """(images, labels) of 20 validation images of each class, label order."""
    split = data.load_dataset("cifar10_sample", "validation")
    idx = np.concatenate([np.flatnonzero(split.labels == c)[:20] for c in range(10)])
    return split.images[idx], split.labels[idx]


def _predictions(model_config, variables, images) -> np.ndarray:
    """Independent of graycnn.training.evaluation: one plain apply of the model."""
    apply = jax.jit(lambda v, x: build_model(model_config).apply(v, x, train=False))
    return np.asarray(apply(variables, images.astype(np.float32))).argmax(-1)


def _save_pngs(folder, images) -> None:
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.png"))


# Case 1: a huge label made loading loop over range(max label).


def test_huge_label_is_refused_at_once_naming_it(tmp_path, val_images):
    images, labels = val_images
    labels = labels.astype(np.int64)
    labels[-1] = 2**31 - 1
    path = tmp_path / "big.npz"
    np.savez(path, images=images, labels=labels)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"{path}: labels must be .* got 2147483647"):
        data.load_dataset(f"npz:{path}", "validation")
    assert time.perf_counter() - start < 5


def test_split_is_linear_in_images_not_in_labels():
    labels = np.array([0, 0, 0, 0, 0, 99_999, 99_999, 99_999, 99_999, 99_999], np.int32)
    split = data._split(np.zeros((10, 2, 2, 3), np.uint8), labels, "validation", "x")
    assert split.labels.tolist() == [0, 99_999] and split.num_classes == 100_000


# Case 2: labels the model does not have were scored (NaN loss, wrong accuracy).


@pytest.mark.parametrize(
    "labels, message",
    [
        (lambda y: np.full_like(y, 10), r"labels 10 \(200 examples\) are not classes of the model"),
        (lambda y: y + 1, r"labels 10 \(20 examples\) .* 0\.\.9 \(1-based labels\?"),
    ],
)
def test_labels_outside_the_model_are_named(tmp_path, shipped, val_images, labels, message):
    images, y = val_images
    path = tmp_path / "bad.npz"
    np.savez(path, images=images, labels=labels(y))
    split = data.load_dataset(f"npz:{path}", "all")
    with pytest.raises(ValueError, match=rf"npz:{path}: {message}"):
        evaluation.evaluate(*shipped, split, "color")


def test_int64_label_beyond_int32_is_not_wrapped(tmp_path, val_images):
    images, y = val_images
    labels = y.astype(np.int64)
    labels[0] = 2**40  # Cast to int32 it was class 0.
    np.savez(tmp_path / "l.npz", images=images, labels=labels)
    with pytest.raises(ValueError, match="got 1099511627776"):
        data.load_dataset(f"npz:{tmp_path / 'l.npz'}", "all")


def test_labels_are_checked_in_training_from_a_checkpoint(tmp_path, sample_npz):
    model_config = ModelConfig("densenet_test", num_classes=5)
    variables = jax.device_get(init_variables(model_config, jax.random.key(0)))
    config = train.TrainConfig(model="densenet_test", dataset=f"npz:{sample_npz}", epochs=1)
    with pytest.raises(ValueError, match=r"labels 5, 6, 7, 8, 9 .* has 5 classes"):
        train.train_and_evaluate(config, str(tmp_path), init=(model_config, variables))
    assert not os.path.exists(tmp_path / "checkpoints")  # Stopped before any training.


# Case 3: a folder of some classes was relabelled 0..k-1 by position.


def test_folder_subset_maps_by_class_name(tmp_path, shipped, val_images):
    images, labels = val_images
    cats, ships = images[labels == 3], images[labels == 8]
    _save_pngs(tmp_path / "sub" / "ship", ships)
    _save_pngs(tmp_path / "sub" / "cat", cats)
    result = evaluation.evaluate(
        *shipped, data.load_dataset(f"folder:{tmp_path / 'sub'}", "all"), "color"
    )
    both = np.concatenate([cats, ships])  # Sorted folder names: cat, then ship.
    expected = np.mean(_predictions(*shipped, both) == np.repeat([3, 8], 20))
    assert result["examples"] == 40 and expected > 0.3
    assert result["accuracy"] == pytest.approx(expected, abs=1e-9)
    # The same images under numbered folders: "3" is class index 3.
    _save_pngs(tmp_path / "num" / "3", cats)
    _save_pngs(tmp_path / "num" / "8", ships)
    by_number = evaluation.evaluate(
        *shipped, data.load_dataset(f"folder:{tmp_path / 'num'}", "all"), "color"
    )
    assert by_number["accuracy"] == pytest.approx(expected, abs=1e-9)


def test_folder_with_unknown_class_names_is_an_error(tmp_path, shipped, val_images):
    images, labels = val_images
    _save_pngs(tmp_path / "class3", images[labels == 3])
    split = data.load_dataset(f"folder:{tmp_path}", "all")
    with pytest.raises(ValueError, match=r"classes 'class3' are unknown to the model.*airplane"):
        evaluation.evaluate(*shipped, split, "color")


def test_named_folder_and_unnamed_model(tmp_path, val_images):
    images, labels = val_images
    _save_pngs(tmp_path / "cat", images[labels == 3][:4])
    model_config = ModelConfig("densenet_test")  # 10 classes, no names (trained on an npz).
    split = data.load_dataset(f"folder:{tmp_path}", "all")
    with pytest.raises(ValueError, match=r"1 classes \('cat'\) but the model has 10 unnamed"):
        evaluation.check_input(model_config, split, "color")


@pytest.mark.slow
def test_folder_training_stores_class_names(tmp_path, val_images):
    """A model trained on a folder knows its classes; a folder of one of them maps to it."""
    images, labels = val_images
    for name, c in (("dog", 5), ("cat", 3)):
        _save_pngs(tmp_path / "data" / name, images[labels == c])
    config = train.TrainConfig(
        model="densenet_test", dataset=f"folder:{tmp_path / 'data'}", epochs=1, batch_size=16
    )
    train.train_and_evaluate(config, str(tmp_path / "run"))
    model_config, variables, _ = checkpoint.load_model(str(tmp_path / "run"))
    assert model_config.class_names == ("cat", "dog") and model_config.num_classes == 2
    _save_pngs(tmp_path / "dogs" / "dog", images[labels == 5])
    split = data.load_dataset(f"folder:{tmp_path / 'dogs'}", "all")
    result = evaluation.evaluate(model_config, variables, split, "color")
    expected = np.mean(_predictions(model_config, variables, images[labels == 5]) == 1)
    assert result["accuracy"] == pytest.approx(expected, abs=1e-9)


def test_old_cifar_checkpoint_gets_cifar_class_names(shipped):
    assert shipped[0].class_names == data.CIFAR10_CLASSES


def test_class_folders_without_images_are_named(tmp_path, val_images):
    images, labels = val_images
    _save_pngs(tmp_path / "cat", images[:2])
    os.makedirs(tmp_path / "dog")
    os.makedirs(tmp_path / "ship")
    with pytest.raises(ValueError, match=r"class folders 'dog', 'ship' hold no images"):
        data.load_dataset(f"folder:{tmp_path}", "all")


# Case 6: distances of finite images >= 1e20 were NaN/inf.


@pytest.mark.parametrize("metric, power", [("imed", 1), ("mse", 2), ("correlation", 0)])
@pytest.mark.parametrize("scale", [1e20, 1e-20, 3e18])
def test_distances_of_huge_and_tiny_images(metric, power, scale):
    images = np.random.default_rng(0).random((4, 6, 6)).astype(np.float32)
    base = np.asarray(distance.pairwise(images, metric), np.float64)
    if metric == "mse" and scale != 3e18:
        # The true distances (~1e39, ~1e-41) do not fit in float32: an error, not inf/0.
        with pytest.raises(ValueError, match=r"mse distances .* beyond the range of float32"):
            distance.pairwise(images * np.float32(scale), metric)
        return
    got = np.asarray(distance.pairwise(images * np.float32(scale), metric), np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got / scale**power, base, rtol=1e-5, atol=1e-12)


def test_ssim_of_huge_images_with_their_data_range():
    images = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    base = np.asarray(distance.pairwise(images, "ssim"))
    huge = distance.pairwise(images * np.float32(1e30), "ssim", data_range=1e30)
    np.testing.assert_allclose(np.asarray(huge), base, rtol=1e-4, atol=1e-6)


# Case 7 and the merge_layer tracebacks: labels and layer types.


@pytest.fixture(scope="module")
def tiny_model():
    model_config = ModelConfig("densenet_test")
    variables = jax.device_get(init_variables(model_config, jax.random.key(0)))
    return build_model(model_config), variables, model_config.input_shape


@pytest.mark.parametrize(
    "layer, labels, message",
    [
        (True, np.arange(8) % 4, r"layer must be a conv number 1\.\.10 .* got True \(bool\)"),
        (1.0, np.arange(8) % 4, r"layer must be a conv number .* got 1\.0 \(float\)"),
        (1, np.arange(8) % 2 == 0, r"labels for conv 'stem' must be integer .* dtype bool"),
        (1, np.array(list("abcdabcd")), r"labels for conv 'stem' must be integer .* <U1"),
        (1, [0, 1, 2, 3, None, 1, 2, 3], r"labels for conv 'stem' .* dtype object"),
        (1, [0, 1, 2, 3, 4, 5, 6, 10**12], r"labels for conv 'stem' must be 0\.\.K-1 with K <= 8"),
        (1, [0, 1, 2, 3, 0, 1, 2, np.nan], r"labels for conv 'stem' must be integers"),
    ],
)
def test_merge_layer_refuses_bad_layer_and_labels(tiny_model, layer, labels, message):
    model, variables, shape = tiny_model
    with pytest.raises(ValueError, match=message):
        merge.merge_layer(model, variables, layer, labels, input_shape=shape)


def test_merge_layer_takes_numpy_integers_and_whole_floats(tiny_model):
    model, variables, shape = tiny_model
    labels = np.arange(8) % 4
    expected = merge.merge_layer(model, variables, 1, labels, input_shape=shape)
    for layer, lab in ((np.int64(1), labels), ("1", labels), (1, labels.astype(np.float32))):
        got = merge.merge_layer(model, variables, layer, lab, input_shape=shape)
        jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_layer_zero_names_the_valid_range():
    with pytest.raises(
        ValueError, match=r"layer 0 does not exist: the model has conv layers 1\.\.2"
    ):
        resolve_layer(0, ["a", "b"])


# Tracebacks that are now one error line.


def test_bad_npz_files_name_the_path_and_the_fault(tmp_path, val_images):
    images, labels = val_images
    cases = {
        "arr.npy": (lambda p: np.save(p, images), "a single .npy array"),
        "empty.npz": (
            lambda p: np.savez(p, images=images[:0], labels=labels[:0]),
            r"holds no images",
        ),
        "text.npz": (lambda p: p.write_text("hello\n"), "not an npz archive"),
        "objects.npz": (
            lambda p: np.savez(p, images=images, labels=np.array([None] * len(labels))),
            r"cannot read the npz archive \(Object arrays cannot be loaded",
        ),
        "floats.npz": (
            lambda p: np.savez(p, images=images, labels=labels.astype(float)),
            "labels must be integer class indices, got float64",
        ),
        "bools.npz": (
            lambda p: np.savez(p, images=images, labels=labels > 4),
            "labels must be integer class indices, got bool",
        ),
        "negative.npz": (
            lambda p: np.savez(p, images=images, labels=labels - 1),
            "labels must be .*got -1",
        ),
        "nolabels.npz": (lambda p: np.savez(p, images=images), r"missing arrays \['labels'\]"),
    }
    for name, (write, message) in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(ValueError, match=rf"{path}: {message}"):
            data.load_dataset(f"npz:{path}", "all")
    good = tmp_path / "good.npz"
    np.savez(good, images=images, labels=labels)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match=rf"{truncated}: not an npz archive"):
        data.load_dataset(f"npz:{truncated}", "all")
    with pytest.raises(ValueError, match=r"is a directory \(a folder dataset is folder:PATH\)"):
        data.load_dataset(f"npz:{tmp_path}", "all")
    # A damaged member inside a valid archive.
    damaged = tmp_path / "damaged.npz"
    with zipfile.ZipFile(damaged, "w") as z:
        z.writestr("images.npy", b"\x93NUMPY garbage")
        z.writestr("labels.npy", b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=rf"{damaged}: cannot read the npz archive"):
        data.load_dataset(f"npz:{damaged}", "all")


def _tree_digest(path) -> dict[str, str]:
    return {
        os.path.relpath(os.path.join(d, f), path): hashlib.sha256(
            open(os.path.join(d, f), "rb").read()
        ).hexdigest()
        for d, _, files in os.walk(path)
        for f in files
    }


def test_checkpoint_whose_config_does_not_fit_its_variables(tmp_path):
    copy = tmp_path / "ck"
    shutil.copytree(CK, copy)
    meta = copy / "0" / "config" / "metadata"
    config = json.loads(meta.read_text())
    config["model"]["name"] = "resnet20"
    meta.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"checkpoint {copy} \(step 0\): its variables do not "):
        checkpoint.load_model(str(copy))
    config["model"] = {"name": "densenet_tiny", "num_classes": 0}
    meta.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"has no valid model config: num_classes must be"):
        checkpoint.load_model(str(copy))


def test_loading_a_checkpoint_writes_nothing_into_it():
    before = _tree_digest(CK)
    checkpoint.load_model(CK)
    assert _tree_digest(CK) == before


def test_corrupt_manifest_is_one_short_line(tmp_path):
    copy = tmp_path / "ck"
    shutil.copytree(CK, copy)
    for f in copy.rglob("manifest.ocdbt"):
        f.write_bytes(b"garbage")
    with pytest.raises(ValueError) as info:
        checkpoint.load_model(str(copy))
    message = str(info.value)
    assert message.startswith(f"checkpoint {copy} (step 0) is corrupt or incomplete: ")
    assert "\n" not in message and "tensorstore_spec" not in message and len(message) < 700


def test_checkpoint_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"is a file, not a checkpoint directory"):
        checkpoint.load_model(str(tmp_path / "f"))


def _unwritable_dir(tmp_path) -> str:
    if os.geteuid() == 0:  # root writes through permissions; /sys is not writable.
        return "/sys/kernel/graycnn_workdir"
    os.chmod(tmp_path, 0o555)
    return str(tmp_path / "run")


def test_bad_workdirs_fail_before_any_work(tmp_path):
    # A dataset that does not exist: the workdir error must come first.
    config = train.TrainConfig(model="densenet_test", dataset="npz:/nonexistent.npz")
    with pytest.raises(ValueError, match=r"--workdir /sys/kernel/graycnn_workdir|not writable"):
        train.train_and_evaluate(config, _unwritable_dir(tmp_path / "ro"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=rf"--workdir {tmp_path / 'file'} is a file"):
        train.train_and_evaluate(config, str(tmp_path / "file"))


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, sample_npz):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = train.TrainConfig(model="densenet_test", dataset=f"npz:{sample_npz}", epochs=1)
    train.train_and_evaluate(config, workdir)
    return config, workdir


@pytest.mark.parametrize(
    "change, message",
    [
        ({"view": "gray"}, r"--view='gray' \(the run has 'color'\)"),
        ({"model": "resnet_test"}, r"--model='resnet_test' \(the run has 'densenet_test'\)"),
        ({"batch_size": 32, "seed": 3}, r"--batch_size=32 .*; --seed=3 \(the run has 0\)"),
    ],
)
def test_resume_with_other_settings_names_the_flags(one_epoch_run, change, message):
    config, workdir = one_epoch_run
    changed = dataclasses.replace(config, epochs=2, **change)
    with pytest.raises(ValueError, match=rf"{workdir} holds a run with other settings: {message}"):
        train.train_and_evaluate(changed, workdir)


def test_resume_on_another_dataset_names_it(one_epoch_run, tmp_path, val_images):
    config, workdir = one_epoch_run
    images, labels = val_images
    np.savez(tmp_path / "five.npz", images=images[labels < 5], labels=labels[labels < 5])
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    # data_dir may change on resume; the dataset may not: its classes size the model.
    changed = dataclasses.replace(config, epochs=2, dataset=f"npz:{tmp_path / 'five.npz'}")
    with pytest.raises(ValueError, match=r"--dataset="):
        train.train_and_evaluate(changed, copy)


def test_empty_validation_split_trains_and_keeps_every_epoch(tmp_path, val_images, capsys):
    images, labels = val_images
    idx = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(10)])
    np.savez(tmp_path / "two.npz", images=images[idx], labels=labels[idx])
    dataset = f"npz:{tmp_path / 'two.npz'}"
    assert len(data.load_dataset(dataset, "validation")) == 0  # round(2 * 0.2) = 0 per class
    config = train.TrainConfig(model="densenet_test", dataset=dataset, epochs=1, batch_size=4)
    _, _, history = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "note: the validation split of" in capsys.readouterr().out  # tqdm.write
    assert history[0]["val_accuracy"] is None and history[0]["step"] == 5
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["5"]
    model_config, variables, _ = checkpoint.load_model(str(tmp_path / "run"))
    with pytest.raises(ValueError, match=rf"{dataset}: nothing to evaluate, the split holds no"):
        evaluation.evaluate(
            model_config, variables, data.load_dataset(dataset, "validation"), "color"
        )


def test_an_epoch_whose_validation_fails_is_still_saved(tmp_path, sample_npz, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("validation failed")

    monkeypatch.setattr(evaluation, "evaluate", fail)
    config = train.TrainConfig(model="densenet_test", dataset=f"npz:{sample_npz}", epochs=1)
    with pytest.raises(ValueError, match="validation failed"):
        train.train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["2"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["val_accuracy"] is None


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epochs", 0, r"--epochs must be an integer >= 1, got 0"),
        ("batch_size", -4, r"--batch_size must be an integer >= 1, got -4"),
        ("learning_rate", float("nan"), r"--learning_rate must be a finite number >= 0"),
        ("momentum", float("inf"), r"--momentum must be a finite number >= 0"),
        ("seed", -1, r"--seed must be in 0\.\.2147483647, got -1"),
        ("model", "vgg", r"--model: unknown model 'vgg'"),
    ],
)
def test_train_config_names_the_flag(field, value, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**{field: value})


def test_model_config_refuses_zero_classes():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"):
        ModelConfig("densenet_tiny", num_classes=0)


def test_offline_cifar10_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_CIFAR10_HOST", "graycnn-offline.invalid")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"cifar10 is not prepared in .* cannot be reached"):
        data.load_dataset("cifar10", "validation", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 30


# The CLIs: one `error:` line, exit status 2, no traceback.


@pytest.mark.slow
def test_cli_huge_label_does_not_hang(tmp_path, val_images):
    images, labels = val_images
    labels = labels.astype(np.int64)
    labels[-1] = 2**31 - 1
    np.savez(tmp_path / "big.npz", images=images, labels=labels)
    result = _run(
        "experiments.evaluate", f"--checkpoint={CK}", f"--dataset=npz:{tmp_path / 'big.npz'}"
    )
    assert "2147483647" in _error_line(result)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["experiments.evaluate", f"--checkpoint={CK}", "--split=tests"], "flag --split=tests"),
        (
            ["experiments.visualize", f"--checkpoint={CK}", "--layers=1,0", "--outdir={out}"],
            "--layers: layer 0 does not exist: the model has conv layers 1..17",
        ),
        (["experiments.summary", "--model=densenet_tiny", "--widths=0:4"], "1..17"),
        (["experiments.summary", "--model=densenet_tiny", "--num_classes=0"], "num_classes"),
    ],
)
@pytest.mark.slow
def test_cli_bad_flags_are_one_error_line(tmp_path, args, expected):
    out = tmp_path / "out"
    result = _run(*(a.format(out=out) for a in args))
    assert expected in _error_line(result)
    assert not out.exists()  # Checked before anything was written.
