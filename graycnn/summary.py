"""A Keras-style per-layer table: every module that owns variables, in forward order."""

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from graycnn import nnx_adapter, tree
from graycnn.config import parse_layer_values
from graycnn.graph import capture
from graycnn.layers import conv_layers, resolve_layer
from graycnn.models import ModelConfig, build_model

_OWNERS = (nn.Conv, nn.BatchNorm, nn.Dense, nnx.Conv, nnx.BatchNorm, nnx.Linear)


@dataclasses.dataclass(frozen=True)
class Row:
    path: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    conv_number: int | None


def parse_widths(
    spec: str, paths: list[str], head: str | None = None, num_classes: int | None = None
) -> dict[str, int]:
    """Parses '1:20,2:12' or 'stem:20,block1/layer1/conv:12' into {conv path: width}.

    Args:
        head, num_classes: The model's classifier path (`graycnn.models.head_path`) and its
            classes: the head's width is --num_classes, never a --widths entry's.

    Raises:
        ValueError: a malformed entry, an unknown layer (listing the layers), or the head
            narrowed (naming it and --num_classes).
    """
    default, widths = parse_layer_values(
        spec, "widths", _positive_int, key=lambda layer: resolve_layer(layer, paths)
    )
    if default is not None:
        raise ValueError(f"--widths: {default} has no layer; give LAYER:WIDTH")
    if head in widths and widths[head] != num_classes:
        number = f"layer {paths.index(head) + 1} ({head})" if head in paths else head
        raise ValueError(
            f"--widths: {number} is the classifier head: its outputs are the classes, "
            f"--num_classes={num_classes}, so it cannot be narrowed to {widths[head]}"
        )
    return widths


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError("WIDTH must be an integer >= 1")
    return int(text)


def summarize(config: ModelConfig) -> list[Row]:
    """One row per variable-owning module (conv, BatchNorm, dense), in call order."""
    model = build_model(config)
    x = jnp.zeros(config.input_shape, jnp.float32)
    return summarize_model(model, jax.eval_shape(model.init, jax.random.key(0), x), x.shape)


def summarize_model(model: Any, variables: Any, input_shape: Sequence[int]) -> list[Row]:
    """`summarize` of any model: a linen module and its variables (arrays or shapes), or
    an nnx.Module and an nnx.State or None (its own). NNX's dense layer is 'Linear'."""
    model, variables, _ = nnx_adapter.adapt(model, variables)
    convs = conv_layers(model, input_shape)
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    calls = capture.capture(model, variables, x, select=_OWNERS)
    flat = tree.flatten(variables)
    rows = []
    for path, call in calls.items():
        params = sum(
            leaf.size
            for key, leaf in flat.items()
            if key.split("/", 1)[1].rpartition("/")[0] == path
        )
        number = convs.index(path) + 1 if path in convs else None
        rows.append(Row(path, type(call.module).__name__, call.output.shape, int(params), number))
    return rows


def format_table(rows: list[Row], total: int) -> str:
    """The table as text, ending with `total parameters: N`."""
    header = f"{'layer':>5}  {'path':<28} {'type':<10} {'output shape':<20} {'params':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        number = "" if r.conv_number is None else str(r.conv_number)
        lines.append(
            f"{number:>5}  {r.path:<28} {r.kind:<10} {str(r.output_shape):<20} {r.params:>9,}"
        )
    lines += ["-" * len(header), f"total parameters: {total}"]
    return "\n".join(lines)
