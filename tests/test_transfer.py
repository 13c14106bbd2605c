"""Transfer: the digits dataset, the new head, the three-model run and its errors."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from sklearn.datasets import load_digits

from graycnn.config import PerLayer
from graycnn.models import ModelConfig, build_model, init_variables
from graycnn.study import validate
from graycnn.training import checkpoint, data
from graycnn.transfer import TransferConfig, new_head, replace_head, transfer
from graycnn.transfer.run import compress_config
from graycnn.tree import flatten

TINY = dict(
    steps=4, eval_every=2, batch_size=16, layers=(1,), num_clusters=PerLayer.of_dict({1: 4})
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_matches_sklearn_with_a_per_class_70_10_20_split():
    ref = load_digits()
    want = np.round(ref.images * 255 / 16).astype(np.uint8)
    everything = data.load_dataset("digits", "all")
    np.testing.assert_array_equal(everything.images[..., 0], want)
    np.testing.assert_array_equal(everything.labels, ref.target)
    assert everything.images.shape == (1797, 8, 8, 1) and everything.images.max() == 255
    assert everything.class_names == tuple("0123456789")
    part = np.full(len(ref.target), "train", object)
    for c in range(10):
        idx = np.flatnonzero(ref.target == c)
        n_test, n_val = round(len(idx) * 0.2), round(len(idx) * 0.1)
        part[idx[len(idx) - n_test :]] = "test"
        part[idx[len(idx) - n_test - n_val : len(idx) - n_test]] = "validation"
    for name in ("train", "validation", "test"):
        split = data.load_dataset("digits", name)
        np.testing.assert_array_equal(split.images[..., 0], want[part == name])
        np.testing.assert_array_equal(split.labels, ref.target[part == name])
    assert [len(data.load_dataset("digits", s)) for s in ("train", "validation", "test")] == [
        1259, 179, 359,
    ]  # fmt: skip


def test_new_head_replaces_only_the_classifier():
    config = ModelConfig("densenet_test", num_classes=10)
    variables = init_variables(config, jax.random.key(0))
    new_config, new = new_head(config, variables, 3, jax.random.key(1), ("a", "b", "c"))
    assert new_config.num_classes == 3 and new_config.class_names == ("a", "b", "c")
    old, fresh = flatten(variables), flatten(new)
    in_features = old["params/head/conv/kernel"].shape[2]
    assert fresh["params/head/conv/kernel"].shape == (2, 2, in_features, 3)
    np.testing.assert_array_equal(fresh["params/head/conv/bias"], 0)
    assert 0 < np.std(fresh["params/head/conv/kernel"]) < 1
    assert set(old) == set(fresh)
    for path in old:
        if not path.startswith("params/head/conv/"):
            np.testing.assert_array_equal(old[path], fresh[path])
    out = build_model(new_config).apply(new, np.zeros((2, 32, 32, 3), np.float32))
    assert out.shape == (2, 3)


def test_replace_head_on_an_nnx_model_finds_the_last_dense():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.fc = nnx.Linear(4, 10, rngs=rngs)

        def __call__(self, x):
            return self.fc(nnx.relu(self.conv(x)).mean(axis=(1, 2)))

    net = Net(nnx.Rngs(0))
    new = replace_head(net, None, 5, jax.random.key(0), input_shape=(1, 8, 8, 1))
    x = np.ones((2, 8, 8, 1), np.float32)
    assert new(x).shape == (2, 5) and net(x).shape == (2, 10)
    np.testing.assert_array_equal(new.conv.kernel[...], net.conv.kernel[...])
    np.testing.assert_array_equal(new.fc.bias[...], 0)


@pytest.fixture(scope="module")
def color_checkpoint(tmp_path_factory) -> str:
    config = ModelConfig("densenet_test", num_classes=10)
    path = str(tmp_path_factory.mktemp("ck") / "color")
    return checkpoint.save_model(path, config, init_variables(config, jax.random.key(3)))


def _folder(root, size: int, classes=("a", "b"), per_class: int = 24, seed: int = 0) -> str:
    """Gray PNGs: class i has a bright square in corner i."""
    rng = np.random.default_rng(seed)
    for i, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for j in range(per_class):
            image = rng.integers(0, 60, (size, size), dtype=np.uint8)
            h = size // 2
            image[(i % 2) * h : (i % 2) * h + h, :h] += 150
            Image.fromarray(image).save(root / name / f"{j}.png")
    return str(root)


@pytest.mark.slow
def test_transfer_runs_three_models_on_digits_resized(color_checkpoint, tmp_path):
    settings = TransferConfig(checkpoint=color_checkpoint, **TINY)
    report = transfer(dataclasses.replace(settings, export=str(tmp_path / "export")))
    assert report["images"] == {"original": [8, 8], "model": [32, 32], "resized": True}
    assert [r["kind"] for r in report["rows"]] == ["scratch", "transfer", "merged"]
    rows = {r["kind"]: r for r in report["rows"]}
    assert [s for s, _ in rows["scratch"]["curve"]] == [0, 2, 4]
    assert rows["merged"]["flops"] < rows["transfer"]["flops"] == rows["scratch"]["flops"]
    assert "ci95" in rows["merged"]["eval"] and "ci95" not in rows["transfer"]["eval"]
    assert rows["scratch"]["steps_to_scratch"] <= 4
    # The best model (validation, then fewer FLOPs) exported, each file checked.
    best = max(report["rows"], key=lambda r: (r["validation"], -r["flops"]))["kind"]
    assert report["export"]["kind"] == best
    assert max(report["export"]["max_abs_diff"].values()) <= 1e-4
    assert sorted(os.listdir(tmp_path / "export")) == [
        "model.stablehlo", "model.tflite", "signature.json"]  # fmt: skip
    again = transfer(settings)
    for a, b in zip(report["rows"], again["rows"], strict=True):
        assert a["curve"] == b["curve"] and a["eval"]["accuracy"] == b["eval"]["accuracy"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.transfer", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_one_class_is_one_error_line(tmp_path, color_checkpoint):
    folder = _folder(tmp_path / "one", 32, classes=("a",))
    with pytest.raises(ValueError, match="one class"):
        transfer(TransferConfig(dataset=f"folder:{folder}", checkpoint=color_checkpoint, **TINY))


def test_eval_classes_the_training_data_lacks_are_refused(tmp_path, color_checkpoint):
    train = _folder(tmp_path / "train", 32, classes=("a", "b"))
    other = _folder(tmp_path / "eval", 32, classes=("a", "c"))
    with pytest.raises(ValueError, match=r"--eval_dataset .*classes c are not classes"):
        transfer(TransferConfig(dataset=f"folder:{train}", eval_dataset=f"folder:{other}",
                                checkpoint=color_checkpoint, **TINY))  # fmt: skip


def test_layers_alone_merge_those_with_their_default_counts():
    """--layers=1 keeps layer 1's default count and passes compress's checks (the other
    defaults, for layers 2 and 3, are not passed on); a count for a layer not merged is
    refused, naming the flag."""
    config = TransferConfig(layers=(1,))
    merged = compress_config(config)
    validate(merged)
    assert merged.layers == (1,) and str(merged.num_clusters) == "1:18"
    assert (
        str(compress_config(TransferConfig(layers=(1,), num_clusters="1:4")).num_clusters) == "1:4"
    )
    with pytest.raises(ValueError, match=r"^--num_clusters: layer 2 is not in --layers=1$"):
        TransferConfig(layers=(1,), num_clusters={2: 5})


@pytest.mark.slow
def test_28x28_pngs_need_resize(tmp_path, color_checkpoint):
    folder = _folder(tmp_path / "d28", 28)
    work = tmp_path / "w28"
    common = [f"--dataset=folder:{folder}", f"--checkpoint={color_checkpoint}", "--steps=4",
              "--eval_every=2", "--batch_size=16", "--layers=1", "--num_clusters=1:4"]  # fmt: skip
    bad = _cli(*common, "--resize=false", f"--workdir={work}")
    assert bad.returncode != 0 and not os.path.exists(work)
    lines = bad.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --resize=false: the model cannot take 28x28"), bad.stderr
    ok = _cli(*common, f"--workdir={work}")
    assert ok.returncode == 0, ok.stderr
    report = json.load(open(work / "report.json"))
    assert report["images"] == {"original": [28, 28], "model": [32, 32], "resized": True}
    assert os.path.getsize(work / "curve.png") > 1000 and "| merged |" in ok.stdout


@pytest.mark.slow
def test_64x64_pngs_run_at_their_size(tmp_path, color_checkpoint):
    folder = _folder(tmp_path / "d64", 64, classes=("a", "b", "c"))
    work = tmp_path / "w64"
    ok = _cli(f"--dataset=folder:{folder}", f"--checkpoint={color_checkpoint}", "--steps=4",
              "--eval_every=2", "--batch_size=16", "--layers=1", "--num_clusters=1:4",
              "--resize=false", f"--workdir={work}")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    report = json.load(open(work / "report.json"))
    assert report["images"] == {"original": [64, 64], "model": [64, 64], "resized": False}
    # 24 images a class, the last 5 (20%, rounded) of each validation.
    assert report["data"] == {"train": 57, "validation": 15, "eval": "validation"}
    assert len(report["rows"][0]["curve"]) == 3
