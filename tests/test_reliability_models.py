"""Reliability of models, checkpoints, imports and evaluation (issue 33): input that
used to give a silently wrong number or a traceback now gives one clear error, and valid
input still gives the right number. docs/hostile_input.md lists each case."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest
from keras_study import build_densenet, randomize

from graycnn import summary
from graycnn.importers.keras import import_keras
from graycnn.layers import conv_layers
from graycnn.models import ModelConfig, build_model, head_path, init_variables
from graycnn.training import checkpoint, data, evaluation, parallel, train

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CK = os.path.join(ROOT, "graycnn", "assets", "densenet_tiny_color")


def _cli_error(*args: str) -> str:
    """The one `error:` line of `python -m ARGS`, after checking exit status 2 and no
    traceback."""
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), result.stderr[-2000:]
    assert sum(line.startswith("error: ") for line in lines) == 1
    return lines[-1]


def _keras_model(image_size: int, seed: int = 0):
    """The study's DenseNet in Keras, 1 layer per block, random weights and statistics."""
    keras.utils.set_random_seed(seed)
    model = build_densenet(keras, layers_per_block=1, image_size=image_size)
    images = np.random.default_rng(seed).integers(0, 256, (16, image_size, image_size, 3))
    randomize(keras, model, images.astype(np.uint8), seed=seed)
    return model


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory) -> str:
    """A valid 32x32 Keras file (the study's DenseNet, 1 layer per block)."""
    path = str(tmp_path_factory.mktemp("keras") / "densenet.h5")
    _keras_model(32).save(path)
    return path


# --- Keras import -------------------------------------------------------------------


def test_keras_64x64_densenet_is_refused_naming_the_head_and_its_shapes(tmp_path):
    """Keras's head pools 2x2 then convolves 2x2: on 64x64 images its 8x8 map gives 3x3
    positions of 10 classes, 90 outputs; graycnn's head would give 10."""
    model = _keras_model(64)
    assert model.output_shape == (None, 90)  # What Keras computes: the reference.
    path = str(tmp_path / "densenet64.h5")
    model.save(path)
    pool = [x.name for x in model.layers if isinstance(x, keras.layers.AveragePooling2D)][-1]
    with pytest.raises(ValueError) as info:
        import_keras(path, str(tmp_path / "ckpt"))
    message = str(info.value)
    assert message.startswith(f"cannot map Keras layer {pool!r} (AveragePooling2D)")
    assert "the 8x8 map of 64x64 images after 3 transitions" in message
    assert "3x3x10 = 90 values" in message and "32x32 to 39x39" in message
    assert not os.path.exists(tmp_path / "ckpt")


@pytest.mark.slow
def test_keras_36x36_densenet_imports_with_keras_outputs(tmp_path):
    """36x36 images reach the head as 4x4 (36 -> 18 -> 9 -> 4), as 32x32 ones do: the
    import keeps Keras's 10 outputs and computes what Keras computes."""
    model = _keras_model(36, seed=1)
    path = str(tmp_path / "densenet36.keras")
    model.save(path)
    summary_ = import_keras(path, str(tmp_path / "ckpt"))
    config, variables, _ = checkpoint.load_model(summary_["checkpoint"])
    assert config.image_size == 36 and config.num_classes == model.output_shape[-1] == 10
    images = np.random.default_rng(2).integers(0, 256, (8, 36, 36, 3)).astype(np.uint8)
    reference = np.asarray(model.predict(images.astype(np.float32), verbose=0))
    logits = build_model(config).apply(variables, images)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits)), reference, atol=1e-5)


def test_h5_whose_model_config_is_a_list_is_one_error_naming_the_file(tmp_path):
    path = str(tmp_path / "listconfig.h5")
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps([{"class_name": "Functional"}])
    with pytest.raises(ValueError, match=f"^{path}: the model config is a JSON list"):
        import_keras(path, str(tmp_path / "ckpt"))
    line = _cli_error(
        "experiments.import_keras", f"--model_file={path}", f"--workdir={tmp_path / 'ck'}"
    )
    assert line.startswith(f"error: {path}: the model config is a JSON list")
    assert not os.path.exists(tmp_path / "ckpt") and not os.path.exists(tmp_path / "ck")


@pytest.mark.parametrize(
    "scale, offset, message",
    [
        (0.0, 0.0, "input_scale must be a finite number > 0, got 0.0"),
        (math.nan, 0.0, "input_scale must be a finite number > 0, got nan"),
        (-1.0, 0.0, "input_scale must be a finite number > 0, got -1.0"),
        (1.0, math.inf, "input_offset must be a finite number, got inf"),
    ],
)
def test_import_refuses_a_scale_that_is_not_positive_or_finite(
    keras_file, tmp_path, scale, offset, message
):
    with pytest.raises(ValueError, match=f"^{message}$"):
        import_keras(keras_file, str(tmp_path / "ckpt"), scale, offset)
    assert not os.path.exists(tmp_path / "ckpt")


@pytest.mark.slow
def test_import_cli_names_the_scale_flag(keras_file, tmp_path):
    line = _cli_error(
        "experiments.import_keras",
        f"--model_file={keras_file}",
        f"--workdir={tmp_path / 'ckpt'}",
        "--input_scale=nan",
    )
    assert line == "error: --input_scale must be a finite number > 0, got nan"
    assert not os.path.exists(tmp_path / "ckpt")


def test_import_refuses_a_rescaling_layer_with_a_negative_scale(tmp_path):
    inputs = keras.layers.Input((32, 32, 3))
    x = keras.layers.Rescaling(-1 / 255, name="flip")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
    path = str(tmp_path / "flip.keras")
    keras.Model(inputs, x).save(path)
    with pytest.raises(ValueError, match="'flip' .* needs a finite scale > 0"):
        import_keras(path, str(tmp_path / "ckpt"))


# --- ModelConfig and checkpoints ----------------------------------------------------


@pytest.mark.parametrize(
    "field, value", [("input_scale", 0), ("input_scale", -1.0), ("input_scale", math.nan),
                     ("input_offset", math.inf), ("input_offset", -math.inf)],
)  # fmt: skip
def test_model_config_refuses_bad_input_scaling(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be a finite number"):
        ModelConfig("densenet_test", **{field: value})
    # Valid ones stay valid, a negative offset included.
    assert ModelConfig("densenet_test", input_scale=0.5, input_offset=-3.0).input_offset == -3.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"widths": {"stem": math.nan}}, "widths['stem'] must be an integer >= 1, got nan"),
        ({"widths": {"stem": 5.7}}, "widths['stem'] must be an integer >= 1, got 5.7"),
        ({"layers_per_block": [2, 1.5, 1, 1]}, "layers_per_block must be positive counts"),
    ],
)
def test_model_config_refuses_widths_and_depths_that_are_not_integers(changes, message):
    """int() used to truncate 5.7 to a width of 5 and fail on NaN naming no field."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        ModelConfig.from_json({"name": "densenet_test", **changes})


def _write_checkpoint(directory, model_config_json, variables) -> str:
    """A checkpoint as save_model writes it, without save_model's own checks: what a
    corrupted or hand-edited one looks like to load_model."""
    mngr = checkpoint.manager(str(directory), max_to_keep=None)
    checkpoint.save(mngr, 0, variables, {"model": model_config_json})
    mngr.close()
    return str(directory)


@pytest.fixture(scope="module")
def shipped():
    model_config, variables, _ = checkpoint.load_model(CK)
    return model_config, variables


def test_load_refuses_nan_input_scale_in_the_config(shipped, tmp_path):
    model_config, variables = shipped
    path = _write_checkpoint(
        tmp_path / "nan", model_config.to_json() | {"input_scale": math.nan}, variables
    )
    with pytest.raises(ValueError) as info:
        checkpoint.load_model(path)
    assert str(info.value) == (
        f"checkpoint {path} (step 0) has no valid model config: "
        "input_scale must be a finite number > 0, got nan"
    )


def test_load_refuses_a_negative_batchnorm_variance(shipped, tmp_path):
    model_config, variables = shipped
    variables = jax.tree.map(np.array, variables)  # A writable copy.
    variables["batch_stats"]["block2"]["layer1"]["bn"]["var"][[3, 5]] = -0.5
    path = _write_checkpoint(tmp_path / "negvar", model_config.to_json(), variables)
    with pytest.raises(ValueError) as info:
        checkpoint.load_model(path)
    assert str(info.value) == (
        f"{path}: ['batch_stats']['block2']['layer1']['bn']['var'] holds 2 negative "
        "BatchNorm variances (min -0.5); a variance is >= 0"
    )
    # save_model holds to the same rule: such a model is never written.
    with pytest.raises(ValueError, match="negative BatchNorm variances"):
        checkpoint.save_model(str(tmp_path / "saved"), model_config, variables)
    assert not os.path.exists(tmp_path / "saved")


# --- evaluation ---------------------------------------------------------------------


def test_evaluation_refuses_nan_logits_counting_them(sample_npz):
    split = data.load_dataset(f"npz:{sample_npz}", "validation")
    model_config = ModelConfig("densenet_test")
    variables = jax.tree.map(np.array, init_variables(model_config, jax.random.key(0)))
    variables["params"]["head"]["conv"]["bias"][:] = np.nan  # Every logit NaN.
    # Argmax of all-NaN rows is class 0: the share of class 0 used to be the accuracy.
    with pytest.raises(ValueError) as info:
        evaluation.evaluate(model_config, variables, split, "color", 8, name="checkpoint /x")
    assert str(info.value) == (
        f"checkpoint /x gives NaN or inf logits on 30 of 30 examples of {split.source}; "
        "its accuracy would be meaningless (broken weights or input scaling?)"
    )


def test_evaluation_counts_only_the_examples_with_nonfinite_logits(sample_npz):
    """A head kernel so large that white images overflow float32 while black ones, whose
    features are all 0 by the head, do not."""
    split = data.load_dataset(f"npz:{sample_npz}", "validation")
    model_config = ModelConfig("densenet_test")
    variables = jax.tree.map(np.array, init_variables(model_config, jax.random.key(0)))
    images = split.images.copy()
    images[:7] = 255
    images[7:] = 0
    split = dataclasses.replace(split, images=images)
    variables["params"]["stem"]["kernel"] *= 1000
    variables["params"]["head"]["conv"]["kernel"][:] = 1e38
    with pytest.raises(ValueError, match="^model densenet_test gives NaN or inf logits on 7 of 30"):
        evaluation.evaluate(model_config, variables, split, "color", 8)


@pytest.mark.parametrize("batch_size", [3, 1])
def test_evaluation_steps_hold_the_batch_size_asked_for(sample_npz, monkeypatch, batch_size):
    """On 2 devices an odd batch size is padded to an even number of rows, not rounded:
    every step evaluates `batch_size` examples, and the result is the same."""
    assert jax.device_count() == 2
    split = data.load_dataset(f"npz:{sample_npz}", "validation")
    model_config = ModelConfig("densenet_test")
    variables = init_variables(model_config, jax.random.key(0))
    reference = evaluation.evaluate(model_config, variables, split, "color", 8)
    sizes = []
    iterate = data.iterate_batches

    def spy(split_, size, **kwargs):
        sizes.append(size)
        return iterate(split_, size, **kwargs)

    monkeypatch.setattr(data, "iterate_batches", spy)
    result = evaluation.evaluate(model_config, variables, split, "color", batch_size)
    assert sizes == [batch_size]
    np.testing.assert_array_equal(result["correct"], reference["correct"])
    assert result["examples"] == 30 and result["accuracy"] == reference["accuracy"]
    np.testing.assert_allclose(result["loss"], reference["loss"], rtol=1e-5)


def test_training_refuses_a_batch_size_the_devices_cannot_split(sample_npz, tmp_path):
    assert jax.device_count() == 2
    config = train.TrainConfig(
        model="densenet_test", dataset=f"npz:{sample_npz}", epochs=1, batch_size=7
    )
    with pytest.raises(ValueError) as info:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert str(info.value) == (
        "--batch_size=7 is not a multiple of the 2 devices, which split each batch "
        "evenly: give a multiple of 2, e.g. 6"
    )
    assert not os.path.exists(tmp_path / "run")
    assert parallel.check_batch_size(64) == 64


# --- the classifier head's width ----------------------------------------------------


@pytest.mark.parametrize(
    "name, head", [("densenet_test", "head/conv"), ("resnet_test", "head")]
)  # fmt: skip
def test_the_head_cannot_be_narrowed(name, head):
    assert head_path(name) == head
    with pytest.raises(ValueError) as info:
        ModelConfig(name, widths={head: 5})
    assert str(info.value) == (
        f"widths: {head!r} is the classifier head, its 10 outputs are the classes "
        "(num_classes); it cannot be narrowed to 5"
    )
    # Its own width, and another class count through num_classes, stay valid.
    assert ModelConfig(name, num_classes=5, widths={head: 5}).num_classes == 5


@pytest.mark.slow
def test_summary_widths_on_the_head_names_the_layer_and_num_classes():
    config = ModelConfig("densenet_tiny")
    paths = conv_layers(build_model(config), config.input_shape)
    assert paths[-1] == "head/conv" and len(paths) == 17
    with pytest.raises(ValueError) as info:
        summary.parse_widths("17:5", paths, head_path(config.name), 10)
    assert str(info.value) == (
        "--widths: layer 17 (head/conv) is the classifier head: its outputs are the "
        "classes, --num_classes=10, so it cannot be narrowed to 5"
    )
    assert summary.parse_widths("1:20", paths, "head/conv", 10) == {"stem": 20}
    line = _cli_error("experiments.summary", "--model=densenet_tiny", "--widths=head/conv:5")
    assert line == f"error: {info.value}"
