"""A Keras-style per-layer table: every module that owns variables, in forward order."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from graycnn import tree
from graycnn.config import parse_layer_values
from graycnn.layers import conv_layers, resolve_layer
from graycnn.models import ModelConfig, build_model


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
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    convs = conv_layers(model, config.input_shape)
    calls: list[tuple[str, str, tuple[int, ...]]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(
            context.module, (nn.Conv, nn.BatchNorm, nn.Dense)
        ):
            calls.append(("/".join(context.module.path), type(context.module).__name__, out.shape))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(model.apply, variables, x)
    flat = tree.flatten(variables)
    rows = []
    for path, kind, shape in calls:
        params = sum(
            leaf.size
            for key, leaf in flat.items()
            if key.split("/", 1)[1].rpartition("/")[0] == path
        )
        number = convs.index(path) + 1 if path in convs else None
        rows.append(Row(path, kind, tuple(shape), int(params), number))
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
