"""Read a saved Keras model's layer graph and weights with h5py alone, no Keras.

Loading a Keras 2 file into Keras 3 (or the reverse) is fragile, and graycnn should not
need TensorFlow, while the files hold all an import needs: the layer graph as JSON and
the weights as HDF5 datasets. Read are

* Keras 2 (tf.keras) and Keras 3 `.h5` (`model.save("m.h5")`): a `model_config`
  attribute and `model_weights/<layer>` groups whose `weight_names` attribute names each
  array (`conv2d_3/kernel:0` in Keras 2, `conv2d_3/kernel` in Keras 3);
* Keras 3 `.keras`: a zip of `config.json` and `model.weights.h5`, where a layer's
  arrays are `layers/<key>/vars/0..n` in creation order (BN: gamma, beta, moving mean,
  moving variance).

Example:
    >>> layers, outputs, meta = read_keras_file("densenet.h5")
    >>> layers[1].kind, layers[1].weights["kernel"].shape, meta["keras_version"]
    ('Conv2D', (3, 3, 3, 36), '2.21.0')
"""

import dataclasses
import io
import json
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class KerasLayer:
    """One layer of a saved Keras model.

    Attributes:
        name: The Keras layer name, e.g. `conv2d_54`.
        kind: The Keras class name, e.g. `Conv2D`.
        config: The layer's Keras config (JSON).
        inputs: Names of the layers whose outputs it reads, in argument order.
        calls: How often the model calls it (2+ for a shared layer).
        weights: Role -> array, roles as Keras names them (`kernel`, `bias`, `gamma`,
            `beta`, `moving_mean`, `moving_variance`).
    """

    name: str
    kind: str
    config: Mapping[str, Any]
    inputs: tuple[str, ...]
    calls: int
    weights: Mapping[str, np.ndarray]


def read_keras_file(path: str) -> tuple[list[KerasLayer], list[str], dict[str, str]]:
    """Reads a Keras `.h5` or `.keras` model file without Keras.

    Returns:
        (layers in the model's order, names of the model's output layers,
        {"format": "h5" | "keras", "keras_version": ...}).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a whole-model Keras file.
    """
    import h5py  # Kept local: the rest of graycnn does not need HDF5.

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Keras model file {path} does not exist")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = set(z.namelist())
                if not {"config.json", "model.weights.h5"} <= names:
                    raise ValueError(f"{path}: a zip without config.json and model.weights.h5")
                meta = json.loads(z.read("metadata.json")) if "metadata.json" in names else {}
                layers, outputs = _parse_config(json.loads(z.read("config.json")), path)
                with h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
                    weights = _keras3_weights(f, layers)
            version, file_format = meta.get("keras_version", "unknown"), "keras"
        elif h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                if "model_config" not in f.attrs:
                    raise ValueError(
                        f"{path} holds weights but no model config (saved with "
                        "save_weights?); save the whole model with model.save"
                    )
                layers, outputs = _parse_config(json.loads(_text(f.attrs["model_config"])), path)
                root = f["model_weights"] if "model_weights" in f else f
                weights = _legacy_weights(root, layers)
                version, file_format = f.attrs.get("keras_version", "unknown"), "h5"
        else:
            raise ValueError(f"{path} is neither a Keras .h5 (HDF5) nor a .keras (zip) file")
    except (OSError, KeyError, TypeError, IndexError, AttributeError, json.JSONDecodeError) as e:
        # h5py raises OSError on a truncated file; a hand-edited config, KeyError, or
        # AttributeError where a list stands for an object deeper down.
        raise ValueError(f"{path} is not a readable Keras model file: {e!r}") from e
    layers = [dataclasses.replace(layer, weights=weights.get(layer.name, {})) for layer in layers]
    return layers, outputs, {"format": file_format, "keras_version": _text(version)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_config(config: Any, path: str) -> tuple[list[KerasLayer], list[str]]:
    if not isinstance(config, Mapping):  # Valid JSON, but a list or a string is no model.
        raise ValueError(
            f"{path}: the model config is a JSON {type(config).__name__}, not a Keras model "
            "(an object with class_name and config)"
        )
    kind, body = config.get("class_name"), config.get("config")
    if kind not in ("Functional", "Model", "Sequential") or not isinstance(body, Mapping):
        raise ValueError(f"{path}: the top level is a {kind!r}, not a Functional model")
    layers: list[KerasLayer] = []
    inputs: tuple[str, ...]
    for entry in body["layers"]:
        name = entry.get("name") or entry["config"]["name"]
        nodes = entry.get("inbound_nodes")
        if kind == "Sequential":  # A chain: each layer reads the one before.
            inputs, calls = ((layers[-1].name,) if layers else ()), 1
        else:
            inputs, calls = tuple(_history(nodes[0])) if nodes else (), len(nodes or [])
        layers.append(KerasLayer(name, entry["class_name"], entry["config"], inputs, calls, {}))
    if kind == "Sequential":
        return layers, [layers[-1].name]
    return layers, _history(body.get("output_layers", []))


def _history(obj: Any) -> list[str]:
    """Names of the layers a node reads. Keras 2 writes `[name, node, tensor, kwargs]`
    lists; Keras 3 writes `__keras_tensor__` dicts whose `keras_history` is that triple."""
    if isinstance(obj, Mapping):
        if obj.get("class_name") == "__keras_tensor__":
            return [obj["config"]["keras_history"][0]]
        return [name for v in obj.values() for name in _history(v)]
    if isinstance(obj, list):
        if len(obj) >= 3 and isinstance(obj[0], str) and isinstance(obj[1], int):
            return [obj[0]]
        return [name for v in obj for name in _history(v)]
    return []


def _legacy_weights(root: Any, layers: list[KerasLayer]) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for layer in layers:
        if layer.name not in root:
            continue
        group = root[layer.name]
        roles = {}
        for weight_name in map(_text, group.attrs.get("weight_names", [])):
            if weight_name not in group:
                continue  # Reported as missing, with the layer's name, when it is needed.
            role = weight_name.rsplit("/", 1)[-1].split(":")[0]  # conv2d_3/kernel:0 -> kernel
            roles[role] = np.asarray(group[weight_name][()])
        out[layer.name] = roles
    return out


# A .keras file stores a layer's arrays by position; these are Keras 3's creation orders.
# Other layers' arrays are kept as var0, var1...: the DenseNet has no use for them.
def _keras3_roles(layer: KerasLayer) -> list[str]:
    if layer.kind == "BatchNormalization":
        return (
            ["gamma"] * bool(layer.config.get("scale", True))
            + ["beta"] * bool(layer.config.get("center", True))
            + ["moving_mean", "moving_variance"]
        )
    return ["kernel", "bias"] if layer.kind in ("Conv2D", "Convolution2D") else []


def _snake_case(name: str) -> str:
    """Keras's own rule: Conv2D -> conv2d, BatchNormalization -> batch_normalization."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _keras3_weights(f: Any, layers: list[KerasLayer]) -> dict[str, dict[str, np.ndarray]]:
    groups = f["layers"] if "layers" in f else {}
    # Recent Keras 3 tags each group with the layer name; older ones only key groups by
    # snake_case class name plus a counter, in the model's layer order.
    by_name = {
        _text(g["vars"].attrs.get("name", "")): key for key, g in groups.items() if "vars" in g
    }
    seen: dict[str, int] = {}
    out = {}
    for layer in layers:
        base = _snake_case(layer.kind)
        n = seen[base] = seen.get(base, -1) + 1
        key = by_name.get(layer.name, base if n == 0 else f"{base}_{n}")
        if key not in groups or "vars" not in groups[key]:
            continue
        arrays = groups[key]["vars"]
        roles = _keras3_roles(layer)
        out[layer.name] = {
            roles[int(i)] if int(i) < len(roles) else f"var{i}": np.asarray(arrays[i][()])
            for i in arrays
        }
    return out
