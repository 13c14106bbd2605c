"""Keras -> graycnn import: Keras itself is the reference. Each test builds the study's
DenseNet in Keras (tests/keras_study.py, random weights and BN statistics), saves it as
Keras saves it, imports the file, and compares graycnn's softmax with Keras's on real
CIFAR-10 images of the embedded sample (atol 1e-5, float32)."""

import json
import os
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest
from keras_study import build_densenet, randomize

from graycnn.importers.keras import import_keras
from graycnn.models import ModelConfig, build_model, count_params
from graycnn.training import checkpoint, data

keras = pytest.importorskip("keras")
# Keras 3.15 on numpy 2 warns on every predict; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ATOL = 1e-5
DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """(64, 32, 32, 3) uint8: the first validation images of the embedded sample."""
    return data.load_dataset("cifar10_sample", "validation").images[:64]


def keras_probs(model, images: np.ndarray) -> np.ndarray:
    # The study fed raw 0-255 pixels as float32.
    return np.asarray(model.predict(images.astype(np.float32), batch_size=64, verbose=0))


def graycnn_probs(directory: str, images: np.ndarray) -> np.ndarray:
    config, variables, _ = checkpoint.load_model(directory)
    model = build_model(config)
    logits = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
    return np.asarray(jax.nn.softmax(logits))


def make_model(images, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    model = build_densenet(keras, **kwargs)
    randomize(keras, model, images, seed=seed)
    return model


@pytest.fixture(scope="module")
def small_model(images):
    """The study's DenseNet at 2 layers per block (49,150 parameters)."""
    return make_model(images, layers_per_block=2)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_keras3_file_computes_what_keras_computes(small_model, images, tmp_path, suffix):
    path = str(tmp_path / f"densenet{suffix}")
    small_model.save(path)
    summary = import_keras(path, str(tmp_path / "ckpt"))
    reference = keras_probs(small_model, images)
    # Keras's softmax is not saturated here, so the comparison sees every layer.
    assert reference.max(axis=1).mean() < 0.6
    np.testing.assert_allclose(graycnn_probs(summary["checkpoint"], images), reference, atol=ATOL)
    assert summary["params"] == small_model.count_params() == 49150
    assert summary["layers_per_block"] == (2, 2, 2, 2)
    assert summary["format"] == suffix[1:]
    config, variables, _ = checkpoint.load_model(summary["checkpoint"])
    assert (config.name, config.layers_per_block, config.widths) == ("densenet_seed", (2,) * 4, {})
    assert (config.input_scale, config.input_offset) == (1.0, 0.0)
    assert count_params(variables) == 49150


def test_keras2_file_computes_what_keras2_computed(images, tmp_path):
    """tests/data/keras2_densenet.h5 was written by tf.keras 2.21 (Keras 2), with its own
    softmax on the same images beside it (tests/data/make_keras2_densenet.py)."""
    reference = np.load(os.path.join(DATA, "keras2_densenet_probs.npz"))
    summary = import_keras(os.path.join(DATA, "keras2_densenet.h5"), str(tmp_path / "ckpt"))
    assert summary["keras_version"] == str(reference["keras_version"]) == "2.21.0"
    assert summary["params"] == int(reference["params"])
    n = int(reference["num_images"])
    np.testing.assert_allclose(
        graycnn_probs(summary["checkpoint"], images[:n]), reference["probs"], atol=ATOL
    )


def test_other_widths_gray_input_rescaling_and_dropout(images, tmp_path):
    """1 layer per block, 24 stem filters (growth 12), a gray input, a Rescaling layer
    and Dropout: widths, in_channels and input scaling all come from the file."""
    gray = np.round(images.astype(np.float32) @ np.array([0.2989, 0.587, 0.114]))
    gray = gray.astype(np.uint8)[..., None]
    model = make_model(
        gray,
        seed=1,
        layers_per_block=1,
        num_filter=24,
        channels=1,
        dropout_rate=0.2,
        rescaling=(1 / 127.5, -1.0),
    )
    path = str(tmp_path / "variant.keras")
    model.save(path)
    summary = import_keras(path, str(tmp_path / "ckpt"))
    np.testing.assert_allclose(
        graycnn_probs(summary["checkpoint"], gray), keras_probs(model, gray), atol=ATOL
    )
    config, _, _ = checkpoint.load_model(summary["checkpoint"])
    assert config.in_channels == 1 and config.layers_per_block == (1, 1, 1, 1)
    assert config.widths["stem"] == 24 and config.widths["block1/layer1/conv"] == 12
    assert config.widths["transition3/conv"] == 12
    np.testing.assert_allclose([config.input_scale, config.input_offset], [1 / 127.5, 127.5])
    assert summary["params"] == model.count_params()


@pytest.mark.slow
def test_full_depth_is_densenet_seed(images, tmp_path):
    """12 layers per block: the study's own network imports as densenet_seed."""
    model = make_model(images[:16], seed=3)
    path = str(tmp_path / "seed.h5")
    model.save(path)
    summary = import_keras(path, str(tmp_path / "ckpt"))
    assert (summary["model"], summary["params"]) == ("densenet_seed", 995230)
    config, _, _ = checkpoint.load_model(summary["checkpoint"])
    assert config.layers_per_block is None and config.widths == {}
    np.testing.assert_allclose(
        graycnn_probs(summary["checkpoint"], images[:16]),
        keras_probs(model, images[:16]),
        atol=ATOL,
    )


def refused(model, tmp_path) -> str:
    path = str(tmp_path / "bad.h5")
    model.save(path)
    with pytest.raises(ValueError) as info:
        import_keras(path, str(tmp_path / "ckpt"))
    assert not os.path.exists(tmp_path / "ckpt")
    return str(info.value)


def test_refuses_a_plain_cnn_naming_the_layer(tmp_path):
    inputs = keras.layers.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.MaxPooling2D(name="the_pool")(x)
    x = keras.layers.Flatten()(x)
    message = refused(keras.Model(inputs, keras.layers.Dense(10)(x)), tmp_path)
    assert "'the_pool' (MaxPooling2D" in message and "BatchNormalization" in message


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda x: keras.layers.Conv2D(18, 3, padding="same", name="bad")(x), "needs no bias"),
        (
            lambda x: keras.layers.Conv2D(18, 5, padding="same", use_bias=False, name="bad")(x),
            "needs kernel (3, 3)",
        ),
        (lambda x: keras.layers.Activation("tanh", name="bad")(x), "not a plain relu"),
    ],
)
def test_refuses_a_corrupted_dense_layer_naming_it(tmp_path, corrupt, expected):
    """The study's DenseNet with the first dense layer's ReLU -> Conv changed."""
    inputs = keras.layers.Input((32, 32, 3))
    stem = keras.layers.Conv2D(36, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(stem)
    if "relu" in expected:
        x = corrupt(x)
    else:
        x = corrupt(keras.layers.Activation("relu")(x))
    x = keras.layers.Concatenate()([stem, x])
    message = refused(keras.Model(inputs, x), tmp_path)
    assert message.startswith("cannot map Keras layer 'bad'") and expected in message


def test_refuses_other_bn_epsilon_and_swapped_concat(tmp_path):
    inputs = keras.layers.Input((32, 32, 3))
    stem = keras.layers.Conv2D(36, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-5, name="bn_eps")(stem)
    assert "'bn_eps'" in refused(keras.Model(inputs, x), tmp_path)
    x = keras.layers.BatchNormalization()(stem)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Conv2D(18, 3, padding="same", use_bias=False)(x)
    x = keras.layers.Concatenate(name="swapped")([x, stem])  # Channels [new, old].
    assert "'swapped'" in refused(keras.Model(inputs, x), tmp_path / "2")


@pytest.mark.parametrize("damage", ["kernel shape", "missing variance"])
def test_refuses_a_damaged_array_naming_the_layer(small_model, tmp_path, damage):
    """A file whose arrays were edited after Keras saved it."""
    path = str(tmp_path / "damaged.h5")
    small_model.save(path)
    convs = [x.name for x in small_model.layers if isinstance(x, keras.layers.Conv2D)]
    bns = [x.name for x in small_model.layers if isinstance(x, keras.layers.BatchNormalization)]
    layer = convs[2] if damage == "kernel shape" else bns[1]
    with h5py.File(path, "r+") as f:
        group = f["model_weights"][layer]
        names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
        name = names[0] if damage == "kernel shape" else names[3]
        array = group[name][()]
        del group[name]
        if damage == "kernel shape":
            group[name] = array[..., :17]  # The config still says 18 filters.
    with pytest.raises(ValueError, match=f"Keras layer '{layer}'") as info:
        import_keras(path, str(tmp_path / "ckpt"))
    assert ("has shape (3, 3, 54, 17)" if damage == "kernel shape" else "moving_variance") in str(
        info.value
    )


@pytest.mark.slow
def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    inputs = keras.layers.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.Dense(10, name="not_densenet")(x)
    path = str(tmp_path / "plain.keras")
    keras.Model(inputs, x).save(path)
    result = subprocess.run(
        [sys.executable, "-m", "experiments.import_keras", f"--model_file={path}"]
        + [f"--workdir={tmp_path / 'ckpt'}"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot map Keras layer 'not_densenet'")


def test_model_config_layers_per_block():
    """The new ModelConfig field round-trips through JSON and stays out of the JSON of
    every other config, so existing checkpoints read and write as before."""
    config = ModelConfig("densenet_seed", layers_per_block=[2, 2, 2, 2])
    assert config.layers_per_block == (2, 2, 2, 2)
    assert ModelConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert "layers_per_block" not in ModelConfig("densenet_seed").to_json()
    assert build_model(config).layers_per_block == (2, 2, 2, 2)
    with pytest.raises(ValueError, match="DenseNet"):
        ModelConfig("resnet20", layers_per_block=(1, 1, 1))
