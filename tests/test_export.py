"""Tests for graycnn.deploy and experiments.export: artifacts that match the Flax model on
real images, and run in a Python where graycnn cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from graycnn.deploy import FILES, export_model, export_stablehlo, run_stablehlo
from graycnn.models import ModelConfig, build_model, init_variables
from graycnn.training import checkpoint, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = data.known_class_names("cifar10_sample")
CONFIG = ModelConfig("densenet_test", in_channels=1, class_names=CLASSES)


@pytest.fixture(scope="module")
def model():
    variables = jax.tree.map(np.asarray, init_variables(CONFIG, jax.random.key(3)))
    images = data.load_dataset("cifar10_sample", "test").images[:24]
    gray = np.asarray(data.apply_view(images, "gray"))
    # The reference: Flax's own apply, not the exported function.
    logits = np.asarray(build_model(CONFIG).apply(variables, gray, train=False))
    return variables, gray, logits


def test_stablehlo_matches_flax_at_any_batch(model):
    variables, gray, logits = model
    blob = export_stablehlo(CONFIG, variables)
    for n in (1, 7, 24):  # the batch dimension is symbolic
        np.testing.assert_allclose(run_stablehlo(blob, gray[:n]), logits[:n], atol=1e-4)


def test_export_refuses_bad_formats_and_images(model, tmp_path):
    variables, gray, _ = model
    with pytest.raises(ValueError, match="unknown export formats \\['onnx'\\]"):
        export_model(CONFIG, variables, str(tmp_path), gray, formats=("onnx",))
    with pytest.raises(ValueError, match=r"shape \(24, 32, 32, 3\); the model takes \(N, 32"):
        export_model(CONFIG, variables, str(tmp_path), np.repeat(gray, 3, -1))
    with pytest.raises(ValueError, match="within 0-255"):
        export_model(CONFIG, variables, str(tmp_path), gray * 2 + 1)
    assert os.listdir(tmp_path) == []


def test_a_wrong_artifact_is_refused_and_nothing_written(model, tmp_path, monkeypatch):
    variables, gray, _ = model
    from graycnn.deploy import export as export_lib

    monkeypatch.setitem(export_lib._RUN, "stablehlo", lambda blob, x: run_stablehlo(blob, x) + 1e-3)
    with pytest.raises(ValueError, match="stablehlo artifact's logits differ .* by 0.001"):
        export_model(CONFIG, variables, str(tmp_path), gray, formats=("stablehlo",))
    assert os.listdir(tmp_path) == []


# Run in a Python that cannot import graycnn: only jax (resp. tensorflow) and the files.
LOAD_STABLEHLO = """
import jax, numpy as np
exported = jax.export.deserialize(bytearray(open("model.stablehlo", "rb").read()))
images = np.load("images.npy")  # (N, H, W, 1) float32, 0-255 luma
np.save("out.npy", np.asarray(exported.call(images)))
"""
LOAD_TFLITE = """
import numpy as np, tensorflow as tf
interpreter = tf.lite.Interpreter(model_path="model.tflite")
images = np.load("images.npy")  # (N, H, W, 1) float32, 0-255 luma
interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], images.shape)
interpreter.allocate_tensors()
interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
interpreter.invoke()
np.save("out.npy", interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
"""


def _run_without_graycnn(directory, script):
    blocker = "import sys; sys.modules['graycnn'] = None  # import graycnn fails\n"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(script)],
        cwd=directory,
        env=env,
        check=True,
        capture_output=True,
    )
    return np.load(os.path.join(directory, "out.npy"))


@pytest.mark.slow
def test_cli_exports_both_formats_that_run_without_graycnn(model, tmp_path):
    variables, gray, logits = model
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save_model(ckpt, CONFIG, variables)
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "experiments.export", f"--checkpoint={ckpt}", f"--out={out}",
         "--check_images=24", "--split=test"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["images"] == 24 and set(result["max_abs_diff"]) == {"stablehlo", "tflite"}
    assert max(result["max_abs_diff"].values()) <= 1e-4
    assert sorted(os.listdir(out)) == sorted([*FILES.values(), "signature.json"])
    signature = json.loads((out / "signature.json").read_text())
    assert signature["input"] | {"view_help": None} == {
        "shape": ["N", 32, 32, 1], "dtype": "float32", "range": [0.0, 255.0], "view": "gray",
        "view_help": None,
    }  # fmt: skip
    assert signature["class_names"] == list(CLASSES) and len(CLASSES) == 10
    np.save(out / "images.npy", gray)
    for script in (LOAD_STABLEHLO, LOAD_TFLITE):
        np.testing.assert_allclose(_run_without_graycnn(out, script), logits, atol=1e-4)


def test_cli_refuses_bad_flags_in_one_line(tmp_path):
    for flag, message in [
        ("--formats=onnx", "error: --formats: unknown ['onnx']; formats: stablehlo, tflite"),
        ("--check_images=0", "error: --check_images must be >= 1, got 0"),
    ]:
        run = subprocess.run(
            [sys.executable, "-m", "experiments.export", f"--checkpoint={tmp_path}",
             f"--out={tmp_path / 'out'}", flag],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        assert run.returncode == 2
        assert run.stderr.strip().splitlines()[-1] == message
    assert not (tmp_path / "out").exists()
