"""Import a Keras model of the study's DenseNet family as a graycnn checkpoint.

The study trained its DenseNet in Keras (its NOTES.md: raw 0-255 pixels, a 3x3 stem,
dense layers BN-ReLU-Conv3x3 concatenated to their input, transitions
BN-ReLU-Conv1x1-AvgPool2, a head BN-ReLU-AvgPool2-Conv2x2(bias)-Flatten-softmax). This
module matches the layers of a saved model (`graycnn.importers.keras_file`, no Keras
needed) one by one, in the model's own order, against that grammar (its rules in
`graycnn.importers.keras_rules`), and moves the weights onto `graycnn.models.DenseNet`:
the same arrays, so the same function. The first layer that does not fit stops the
import with a ValueError naming it.

Example:
    >>> summary = import_keras("densenet.h5", "/tmp/imported")
    >>> summary["model"], summary["layers_per_block"], summary["params"]
    ('densenet_seed', (12, 12, 12, 12), 995230)
"""

import functools
import os
import typing
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from graycnn.config import check_number
from graycnn.importers.keras_file import KerasLayer, read_keras_file
from graycnn.importers.keras_rules import _RULES, _Cursor, _pair
from graycnn.models import MODELS, ModelConfig, build_model, count_params
from graycnn.models.densenet import DenseNet
from graycnn.training import checkpoint


def check_input_scaling(input_scale: Any, input_offset: Any, prefix: str = "") -> None:
    """Raises ValueError unless `input_scale` is a finite number > 0 and `input_offset` a
    finite number (a scale <= 0 inverts or erases the image; NaN or inf, every logit).

    Args:
        prefix: Put before the names in the message, e.g. '--' for flags.
    """
    check_number(f"{prefix}input_scale", input_scale, positive=True)
    check_number(f"{prefix}input_offset", input_offset)


def _weight(layer: KerasLayer, role: str, shape: tuple[int, ...]) -> np.ndarray:
    """The layer's `role` array as float32, which must have `shape` (the channels the
    DenseNet feeds it): a file whose arrays disagree with its config is refused here."""
    if role not in layer.weights:
        flag = {"gamma": "scale", "beta": "center"}.get(role)
        if flag and not layer.config.get(flag, True):
            # BN with scale=False / center=False: gamma 1 / beta 0 is the same function.
            return np.full(shape, 1.0 if role == "gamma" else 0.0, np.float32)
        raise ValueError(f"Keras layer {layer.name!r} has no {role!r} array in the file")
    array = np.asarray(layer.weights[role])
    if array.shape != shape:
        raise ValueError(
            f"Keras layer {layer.name!r}: {role} has shape {array.shape}, the DenseNet "
            f"feeds it {shape}"
        )
    # float32 throughout: the study trained in float32 (float16 files are cast up).
    return array.astype(np.float32)


def _bn_variables(bn: KerasLayer, channels: int) -> tuple[dict, dict]:
    params = {"scale": _weight(bn, "gamma", (channels,)), "bias": _weight(bn, "beta", (channels,))}
    stats = {
        "mean": _weight(bn, "moving_mean", (channels,)),
        "var": _weight(bn, "moving_variance", (channels,)),
    }
    return params, stats


def _kernel(conv: KerasLayer, channels: int) -> np.ndarray:
    size = _pair(conv.config["kernel_size"])
    return _weight(conv, "kernel", (*size, channels, int(conv.config["filters"])))


def map_densenet(
    layers: list[KerasLayer],
    outputs: list[str],
    input_scale: float = 1.0,
    input_offset: float = 0.0,
) -> tuple[ModelConfig, dict[str, Any]]:
    """Matches the Keras layers to graycnn's DenseNet and moves their weights over.

    Args:
        layers: From `read_keras_file`, in the model's order.
        outputs: The model's output layer names.
        input_scale, input_offset: What the Keras model was fed, as (pixels - offset) *
            scale; the study fed raw 0-255 pixels (1, 0). A `Rescaling` layer after the
            input is composed with it.

    Returns:
        (model config, {'params', 'batch_stats'} as float32 numpy arrays).

    Raises:
        ValueError: naming the first layer that does not fit the DenseNet.
    """
    # Longer than our usual functions on purpose: one pass over the Keras layers in
    # order, a small parser whose state (cursor, channels, block) every branch updates;
    # split into functions, that state would be threaded through all of them.
    check_input_scaling(input_scale, input_offset)
    cur = _Cursor(layers)
    x = cur.take("input").name
    shape = layers[0].config.get("batch_shape") or layers[0].config.get("batch_input_shape")
    # Height and width (None where Keras left them open: the study's 32x32 is assumed).
    size = (shape[1] or 32, shape[2] or 32) if shape and len(shape) == 4 else (32, 32)
    if size[0] != size[1]:
        raise ValueError(
            f"cannot map Keras layer {layers[0].name!r} (InputLayer): its images are "
            f"{size[0]}x{size[1]}, graycnn's models take square images"
        )
    spatial = int(size[0])  # The feature map's side: transitions halve it (rounding down).
    if getattr(cur.peek(), "kind", None) in _RULES["rescaling"][0]:  # `take` says what is wrong.
        # Keras computes y * s + o on y = (p - offset) * scale, i.e. (p - offset') * scale'.
        c = cur.take("rescaling", reads=(x,))
        s, o = float(c.config.get("scale", 1.0)), float(c.config.get("offset", 0.0))
        input_offset, input_scale, x = input_offset - o / (input_scale * s), input_scale * s, c.name
    stem = cur.take("conv", reads=(x,), kernel=(3, 3), padding="same", bias=False)
    in_channels = int(shape[-1]) if shape and shape[-1] else 3
    params: dict[str, Any] = {"stem": {"kernel": _kernel(stem, in_channels)}}
    stats: dict[str, Any] = {}
    # `channels`: what the next layer reads, e.g. 36 + 18 n inside the study's block 1.
    x, block, blocks, channels = stem.name, 1, [0], int(stem.config["filters"])
    path: tuple[str, ...]
    while True:
        # Dense layer, transition and head all start BN -> ReLU; the layer after decides.
        bn = cur.take("bn", reads=(x,))
        relu = cur.take("relu", reads=(bn.name,))
        bn_params, bn_stats = _bn_variables(bn, channels)
        role = _role_of(cur.peek()) if blocks[-1] else "dense layer"
        if role == "dense layer":
            blocks[-1] += 1
            path = (f"block{block}", f"layer{blocks[-1]}")
            conv = cur.take("conv", reads=(relu.name,), kernel=(3, 3), padding="same", bias=False)
            y = cur.take("dropout", reads=(conv.name,)).name if cur.fits("dropout") else conv.name
            x = cur.take("concat", reads=(x, y)).name  # Order matters: channels [x, y].
            conv_params: dict[str, Any] = {"kernel": _kernel(conv, channels)}
            channels += int(conv.config["filters"])
        elif role == "transition":
            path = (f"transition{block}",)
            conv = cur.take("conv", reads=(relu.name,), kernel=(1, 1), padding="same", bias=False)
            y = cur.take("dropout", reads=(conv.name,)).name if cur.fits("dropout") else conv.name
            x = cur.take("avgpool", reads=(y,)).name
            conv_params = {"kernel": _kernel(conv, channels)}
            channels = int(conv.config["filters"])
            block, blocks, spatial = block + 1, [*blocks, 0], spatial // 2
        elif role == "head":
            path = ("head",)
            pool = cur.take("avgpool", reads=(relu.name,))
            conv = cur.take("conv", reads=(pool.name,), kernel=(2, 2), padding="valid", bias=True)
            x = cur.take("flatten", reads=(conv.name,)).name
            _check_head_map(pool, conv, spatial, int(size[0]), len(blocks) - 1)
            bias = _weight(conv, "bias", (int(conv.config["filters"]),))
            conv_params = {"kernel": _kernel(conv, channels), "bias": bias}
        else:
            cur.fail(
                "after BatchNormalization -> ReLU the DenseNet has a Conv2D 3x3 (dense layer), "
                "a Conv2D 1x1 (transition) or an AveragePooling2D (head)"
            )
        _put(params, (*path, "bn"), bn_params)
        _put(params, (*path, "conv"), conv_params)
        _put(stats, (*path, "bn"), bn_stats)
        if path == ("head",):
            break
    if cur.fits("softmax"):  # graycnn models return logits; softmax keeps the argmax.
        x = cur.take("softmax", reads=(x,)).name
    if cur.i < len(layers):
        cur.fail("the DenseNet ends with its head (Flatten, then an optional softmax)")
    if outputs != [x]:
        raise ValueError(f"the Keras model outputs {outputs}, not its last layer {x!r}")
    config = ModelConfig(
        _registry_name(tuple(blocks)),
        in_channels=in_channels,
        num_classes=int(params["head"]["conv"]["kernel"].shape[3]),
        image_size=int(size[0]),
        input_scale=input_scale,
        input_offset=input_offset,
        layers_per_block=tuple(blocks),
    )
    if config.layers_per_block == _registry_blocks(config.name):
        config = config.replace(layers_per_block=None)  # The registry entry says it.
    variables = {"params": params, "batch_stats": stats}
    return _fit_widths(config, variables), variables


def _check_head_map(
    pool: KerasLayer, conv: KerasLayer, side: int, image: int, transitions: int
) -> None:
    """Refuses a head that reads anything but a 4x4 map. Keras pools 2x2 and convolves
    2x2 (valid), so a side x side map gives (side // 2 - 1)^2 positions, each with the
    classes, while graycnn's head pools any even map down to 2x2, one position: the two
    are the same function on a 4x4 map only (e.g. 64x64 images: 8x8, 3x3 x 10 = 90 outputs
    in Keras, 10 in graycnn)."""
    if side == 4:
        return
    classes = int(conv.config["filters"])
    positions = max(side // 2 - 1, 0)
    low = 4 << transitions
    raise ValueError(
        f"cannot map Keras layer {pool.name!r} (AveragePooling2D) onto the study's DenseNet: "
        f"it reads the {side}x{side} map of {image}x{image} images after {transitions} "
        f"transitions, so Keras's head ({pool.name!r}, then {conv.name!r}) outputs "
        f"{positions}x{positions}x{classes} = {positions * positions * classes} values per "
        f"image where graycnn's head outputs {classes}; the two agree on a 4x4 map only "
        f"({low}x{low} to {low + (1 << transitions) - 1}x{low + (1 << transitions) - 1} images)"
    )


def _role_of(layer: KerasLayer | None) -> str | None:
    """What a layer after BN -> ReLU begins, by its class and kernel alone, so that the
    rule's `take` then reports any other mismatch (bias, padding...) in its own words."""
    if layer is None:
        return None
    if layer.kind in _RULES["conv"][0]:
        return {(3, 3): "dense layer", (1, 1): "transition"}.get(
            _pair(layer.config.get("kernel_size"))
        )
    return "head" if layer.kind in _RULES["avgpool"][0] else None


def _put(tree: dict, path: tuple[str, ...], value: dict) -> None:
    for key in path:
        tree = tree.setdefault(key, {})
    tree.update(value)


def _registry_blocks(name: str) -> tuple[int, ...] | None:
    factory = typing.cast(functools.partial, MODELS[name])  # the registry's partials
    return tuple(factory.keywords["layers_per_block"]) if factory.func is DenseNet else None


def _registry_name(blocks: tuple[int, ...]) -> str:
    """The public DenseNet entry of this depth (densenet_seed for 12 per block), else
    densenet_seed with `layers_per_block` set in the config."""
    matches = [n for n in MODELS if _registry_blocks(n) == blocks]
    return matches[0] if matches else "densenet_seed"


def _fit_widths(config: ModelConfig, variables: Mapping[str, Any]) -> ModelConfig:
    """Sets `widths` for every conv whose filters differ from the registry's, then checks
    that every imported array has exactly the shape the graycnn model expects."""
    model = build_model(config)
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(config.input_shape))
    got = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree.leaves_with_path(variables)}
    widths = {}
    for p, leaf in jax.tree.leaves_with_path(expected["params"]):
        keys = [k.key for k in p]
        if keys[-1] == "kernel" and keys[:-1] != ["head", "conv"]:
            imported = got.get(jax.tree_util.keystr((jax.tree_util.DictKey("params"), *p)))
            if imported is not None and imported[-1] != leaf.shape[-1]:
                widths["/".join(keys[:-1])] = int(imported[-1])
    config = config.replace(widths=widths)
    model = build_model(config)
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(config.input_shape))
    want = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree.leaves_with_path(expected)}
    if want != got:
        diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        raise ValueError(
            f"imported arrays do not fit {config.name}: {diff[0]} is {got.get(diff[0])}, "
            f"the model needs {want.get(diff[0])}"
        )
    return config


def import_keras(
    model_file: str, workdir: str, input_scale: float = 1.0, input_offset: float = 0.0
) -> dict[str, Any]:
    """Converts a saved Keras DenseNet into a graycnn checkpoint at `workdir`.

    Args:
        model_file: A `.h5` (Keras 2 or 3) or `.keras` file written by `model.save`.
        workdir: The new checkpoint directory; must not exist.
        input_scale, input_offset: What the Keras model was fed as (pixels - offset) *
            scale, for pixels 0-255 (the study: raw pixels, 1 and 0).

    Returns:
        {"checkpoint", "model", "layers_per_block", "params", "in_channels",
        "num_classes", "widths", "format", "keras_version", "keras_layers"}.

    Raises:
        ValueError: an input_scale that is not finite and > 0, an input_offset that is
            not finite, a file that is not a Keras model, or a layer that does not fit
            the DenseNet (naming it).
    """
    check_input_scaling(input_scale, input_offset)
    layers, outputs, meta = read_keras_file(model_file)
    config, variables = map_densenet(layers, outputs, input_scale, input_offset)
    source = {"file": os.path.abspath(model_file), **meta}
    directory = checkpoint.save_model(workdir, config, variables, imported_from=source)
    return {
        "checkpoint": directory,
        "model": config.name,
        "layers_per_block": config.layers_per_block or _registry_blocks(config.name),
        "params": count_params(variables),
        "in_channels": config.in_channels,
        "num_classes": config.num_classes,
        "widths": dict(config.widths),
        "keras_layers": len(layers),
        **meta,
    }
