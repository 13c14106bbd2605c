"""A new classifier head for another task: the last layer's kernel and bias replaced by
fresh ones for the user's classes, every other weight kept.

Example:
    >>> config, variables = new_head(color_config, variables, 4, jax.random.key(0),
    ...                              class_names=("a", "b", "c", "d"))
    >>> tree = replace_head(any_linen_model, variables, 4, jax.random.key(0),
    ...                     input_shape=(1, 32, 32, 3))
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from graycnn import graph, nnx_adapter
from graycnn.models import ModelConfig, build_model, head_path
from graycnn.tree import flatten, unflatten


def find_head(model: Any, variables: Any, input_shape: Sequence[int]) -> str:
    """The module path of `model`'s classifier: the last conv or dense layer that
    `graph.trace` finds in the forward pass (linen or NNX)."""
    g = graph.trace(model, variables, input_shape)
    order = [p for p in g.conv_order if p in g.layers] or list(g.layers)
    dense = [p for p in g.layers if p not in g.conv_order]
    if not order and not dense:
        raise ValueError("the model has no conv or dense layer to serve as the head")
    # A dense layer follows every conv in a CNN classifier; without one, the last conv.
    return dense[-1] if dense else order[-1]


def replace_head(
    model: Any,
    variables: Any,
    num_classes: int,
    rng: jax.Array,
    *,
    head: str | None = None,
    input_shape: Sequence[int] | None = None,
) -> Any:
    """`variables` with the head's kernel re-initialised (LeCun normal, Flax's default)
    to `num_classes` outputs and its bias zeroed; every other leaf is kept as is.

    Args:
        model: A linen module, or an nnx.Module (then `variables` is an nnx.State or None
            for its own state, and the result is a new State or Module, as
            `graycnn.fold.fold_to_gray` returns).
        head: The head's module path (e.g. 'head/conv'); None finds it (`find_head`,
            which needs `input_shape`).

    Raises:
        ValueError: num_classes < 1, or no kernel at the head's path (naming it).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    adapted, tree, back = nnx_adapter.adapt(model, variables)
    if head is None:
        if input_shape is None:
            raise ValueError("replace_head needs input_shape to find the head, or head=PATH")
        head = find_head(adapted, tree, input_shape)
    flat = dict(flatten(tree))
    kernel_path = f"params/{head}/kernel"
    if kernel_path not in flat:
        raise ValueError(f"no kernel at {kernel_path!r}: is {head!r} the classifier head?")
    kernel = flat[kernel_path]
    shape = (*np.shape(kernel)[:-1], num_classes)
    fan_in = int(np.prod(shape[:-1]))
    k_rng, _ = jax.random.split(rng)
    new = jax.random.truncated_normal(k_rng, -2.0, 2.0, shape, jnp.float32)
    # Flax's lecun_normal: variance 1/fan_in from a normal truncated at 2 std.
    new = new * jnp.sqrt(1.0 / fan_in) / 0.87962566103423978
    flat[kernel_path] = np.asarray(new, np.asarray(kernel).dtype)
    bias_path = f"params/{head}/bias"
    if bias_path in flat:
        flat[bias_path] = np.zeros((num_classes,), np.asarray(flat[bias_path]).dtype)
    return back(unflatten(flat))


def new_head(
    model_config: ModelConfig,
    variables: Mapping[str, Any],
    num_classes: int,
    rng: jax.Array,
    class_names: Sequence[str] = (),
) -> tuple[ModelConfig, dict[str, Any]]:
    """A project model (`graycnn.models`) with a new head for `num_classes` classes
    named `class_names` (or only indexed, for ()): (its config, its variables).

    The head is the family's classifier (`graycnn.models.head_path`: 'head/conv' of a
    DenseNet, 'head' of a ResNet), else the one `find_head` traces.
    """
    model = build_model(model_config)
    head = head_path(model_config.name)
    tree = replace_head(
        model, dict(variables), num_classes, rng, head=head, input_shape=model_config.input_shape
    )
    widths = dict(model_config.widths)
    if head in widths:
        widths[head] = num_classes
    config = model_config.replace(
        num_classes=num_classes, class_names=tuple(class_names), widths=widths
    )
    return config, tree
