"""A model as files that run without graycnn: StableHLO (jax.export) and TFLite.

Both artifacts are the inference function of one model with its variables baked in:
images (N, H, W, C) float32 in 0-255, as `graycnn.training.data.apply_view` gives them
for the model's view (C = 1: 'gray', BT.601 luma; C = 3: 'color'), to logits
(N, num_classes) float32. The batch dimension is symbolic. Each artifact is run on real
images at export time and compared with the Flax model it came from.

Example:
    >>> result = export_model(config, variables, "out/", images)
    >>> result.max_abs_diff  # {'stablehlo': 0.0, 'tflite': 2e-06}
"""

import dataclasses
import os
import platform
import warnings
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from graycnn import __version__
from graycnn.io import write_atomically, write_json
from graycnn.models import ModelConfig, build_model

FORMATS = ("stablehlo", "tflite")
FILES = {"stablehlo": "model.stablehlo", "tflite": "model.tflite"}
# Logits of an artifact may differ from the Flax model's by float rounding only (XLA and
# TFLite's kernels sum in other orders); a wrong graph differs by whole units.
TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Exported:
    """What `export_model` wrote and how each artifact compared with the Flax model.

    Attributes:
        directory: Where the files are.
        files: Format -> path of its artifact; 'signature' -> signature.json.
        max_abs_diff: Format -> largest |logit difference| on the check images.
        agreement: Format -> fraction of check images with the same argmax.
        images: How many images were checked.
    """

    directory: str
    files: Mapping[str, str]
    max_abs_diff: Mapping[str, float]
    agreement: Mapping[str, float]
    images: int


def view_of(config: ModelConfig) -> str:
    """The view an artifact's input is in: 'gray' for 1-channel models, else 'color'."""
    return "gray" if config.in_channels == 1 else "color"


def inference_function(
    config: ModelConfig, variables: Mapping[str, Any]
) -> Callable[[jax.Array], jax.Array]:
    """logits = f(images): the eval-mode forward with `variables` as constants.

    images: (N, H, W, in_channels) float32, 0-255. Returns (N, num_classes) float32.
    """
    model = build_model(config)
    constants = jax.tree.map(jnp.asarray, dict(variables))

    def logits(images: jax.Array) -> jax.Array:
        out: jax.Array = model.apply(constants, images, train=False)  # type: ignore[assignment]
        return out

    return logits


def _input_spec(config: ModelConfig) -> tuple[str, tuple[int, ...]]:
    size, channels = config.image_size, config.in_channels
    return f"(b, {size}, {size}, {channels})", (size, size, channels)


def export_stablehlo(config: ModelConfig, variables: Mapping[str, Any]) -> bytes:
    """The serialized `jax.export.Exported` of `inference_function`, batch symbolic.

    Load it with jax alone: `jax.export.deserialize(blob).call(images)`.
    """
    _, image_shape = _input_spec(config)
    (batch,) = jax.export.symbolic_shape("b")
    fn = jax.jit(inference_function(config, variables))
    spec = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    return bytes(jax.export.export(fn)(spec).serialize())


def export_tflite(config: ModelConfig, variables: Mapping[str, Any]) -> bytes:
    """A TFLite flatbuffer of `inference_function` (jax2tf, then TFLite's converter).

    Load it with TensorFlow alone (`tf.lite.Interpreter(model_content=blob)`); resize its
    input to the batch (`resize_tensor_input`) before `allocate_tensors`.
    """
    import tensorflow as tf  # The tfds extra; only this function needs it.
    from jax.experimental import jax2tf

    polymorphic, image_shape = _input_spec(config)
    converted = jax2tf.convert(
        inference_function(config, variables), polymorphic_shapes=[polymorphic]
    )
    signature = [tf.TensorSpec((None, *image_shape), tf.float32, name="images")]
    function = tf.function(converted, autograph=False, input_signature=signature)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()], function
    )
    return bytes(converter.convert())


def run_stablehlo(blob: bytes, images: np.ndarray) -> np.ndarray:
    """Logits of a serialized StableHLO artifact on images (N, H, W, C) float32."""
    return np.asarray(jax.export.deserialize(bytearray(blob)).call(images))


def run_tflite(blob: bytes, images: np.ndarray) -> np.ndarray:
    """Logits of a TFLite artifact on images (N, H, W, C) float32."""
    import tensorflow as tf

    with warnings.catch_warnings():  # "use ai_edge_litert": not a dependency of ours.
        warnings.filterwarnings("ignore", "\\s*Warning: tf.lite.Interpreter is deprecated")
        interpreter = tf.lite.Interpreter(model_content=blob)
    (given,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(given["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(given["index"], np.asarray(images, np.float32))
    interpreter.invoke()
    return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


_EXPORT = {"stablehlo": export_stablehlo, "tflite": export_tflite}
_RUN = {"stablehlo": run_stablehlo, "tflite": run_tflite}


def signature(config: ModelConfig) -> dict[str, Any]:
    """What a caller of the artifacts needs to know, without graycnn (signature.json)."""
    _, image_shape = _input_spec(config)
    versions = {"graycnn": __version__}
    for package in ("jax", "jaxlib", "flax", "tensorflow-cpu", "tensorflow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "input": {
            "shape": ["N", *image_shape],
            "dtype": "float32",
            "range": [0.0, 255.0],
            "view": view_of(config),
            "view_help": "gray: BT.601 luma of RGB (0.2989 R + 0.5870 G + 0.1140 B), 0-255"
            if view_of(config) == "gray"
            else "color: RGB, 0-255",
        },
        "output": {"shape": ["N", config.num_classes], "dtype": "float32", "kind": "logits"},
        "class_names": list(config.class_names),
        "model": config.to_json(),
        "versions": versions | {"python": platform.python_version()},
    }


def _write_bytes(path: str, blob: bytes) -> str:
    return write_atomically(path, lambda f: f.write(blob))


def check_images(images: Any, config: ModelConfig) -> np.ndarray:
    """`images` as the artifacts take them, or ValueError naming the shape or range."""
    x = np.asarray(images, np.float32)
    _, image_shape = _input_spec(config)
    if x.ndim != 4 or x.shape[1:] != image_shape or len(x) == 0:
        raise ValueError(
            f"check images have shape {x.shape}; the model takes "
            f"(N, {', '.join(map(str, image_shape))}) with N >= 1"
        )
    if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 255:
        raise ValueError("check images must be finite and within 0-255, as the views give them")
    return x


def export_model(
    config: ModelConfig,
    variables: Mapping[str, Any],
    directory: str,
    images: Any,
    formats: Sequence[str] = FORMATS,
    tolerance: float = TOLERANCE,
) -> Exported:
    """Writes each format's artifact and signature.json to `directory`, each checked.

    Args:
        config: The model's config (its checkpoint's).
        variables: Its variables.
        directory: Output directory (made if missing); files are replaced atomically.
        images: (N, H, W, C) float32 in 0-255, the model's view of real images: every
            artifact's logits on them must be within `tolerance` of the Flax model's.
        formats: A subset of FORMATS.

    Returns:
        An `Exported`.

    Raises:
        ValueError: an unknown format, bad images, or an artifact whose logits differ by
            more than `tolerance` (nothing of that format is written).
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown export formats {unknown}; formats: {', '.join(FORMATS)}")
    x = check_images(images, config)
    reference = np.asarray(jax.jit(inference_function(config, variables))(x))
    blobs, diffs, agreement = {}, {}, {}
    for kind in formats:  # Every artifact is checked before any is written.
        blobs[kind] = _EXPORT[kind](config, variables)
        logits = _RUN[kind](blobs[kind], x)
        diffs[kind] = float(np.max(np.abs(logits - reference)))
        agreement[kind] = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
        if not diffs[kind] <= tolerance:
            raise ValueError(
                f"the {kind} artifact's logits differ from the Flax model's by {diffs[kind]:.3g}"
                f" (more than {tolerance:g}) on {len(x)} images; nothing was written"
            )
    files = {
        kind: _write_bytes(os.path.join(directory, FILES[kind]), b) for kind, b in blobs.items()
    }
    files["signature"] = write_json(os.path.join(directory, "signature.json"), signature(config))
    return Exported(directory, files, diffs, agreement, len(x))
