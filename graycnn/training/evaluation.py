"""Accuracy and loss of a model on a dataset split, data parallel, every example once."""

import functools
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from graycnn import xla_options
from graycnn.models import ModelConfig, build_model
from graycnn.training import data, parallel, transforms

# On the CPU an eval step runs each device's rows in chunks of this many images, one
# chunk after another (parallel.map_in_chunks): the fastest chunk size on both DenseNets
# (benchmarks/README.md).
CPU_EVAL_CHUNK = 4


def make_eval_step(model: flax.linen.Module, view: str) -> Callable:
    """Returns jitted step(variables, images, labels, mask) -> sums of correct, loss, count.

    Cached: `evaluate` runs every epoch and for every report row, and a fresh jit of a
    fresh closure would trace and compile again each time. Modules hash by value.
    """
    # Read at every call (xla_options.set_cpu_speedups may switch it), so a cache key.
    return _eval_step(model, view, CPU_EVAL_CHUNK if xla_options.cpu_speedups() else 0)


@functools.lru_cache(maxsize=32)
def _eval_step(model: flax.linen.Module, view: str, chunk: int) -> Callable:
    def logits_of(variables, images):
        return model.apply(variables, transforms.apply_view(images, view), train=False)

    if chunk:
        logits_of = parallel.map_in_chunks(logits_of, chunk)

    def step(variables, images, labels, mask):
        logits = logits_of(variables, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        # argmax of an all-NaN row is class 0: such rows are counted, and refused.
        nonfinite = 1.0 - jnp.all(jnp.isfinite(logits), -1).astype(jnp.float32)
        return {
            "correct": jnp.sum(correct * mask),
            "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask),
            "nonfinite": jnp.sum(nonfinite * mask),
            "per_example": correct,
        }

    return jax.jit(step)


def evaluate(
    model_config: ModelConfig,
    variables: Mapping[str, Any],
    split: data.Split,
    view: str,
    batch_size: int = 500,
    name: str | None = None,
) -> dict[str, Any]:
    """Accuracy and mean loss of a model on a split, every example counted once.

    Args:
        batch_size: Examples per step (at most the split's); a step's rows are padded to
            a multiple of the device count, the padding masked out.
        name: What an error calls the model, e.g. 'checkpoint /tmp/ck'; default
            'model NAME'.

    Returns:
        {'accuracy': 0..1, 'loss': float, 'examples': int, 'correct': (N,) bool, in the
        split's order: what paired statistics compare}.

    Raises:
        ValueError: see `check_input`; an empty split; batch_size < 1; logits with NaN
            or inf (counting the examples).
    """
    split = check_input(model_config, split, view)
    if len(split) == 0:
        raise ValueError(f"{split.source}: nothing to evaluate, the split holds no examples")
    examples = _examples_per_step(batch_size, len(split))
    batch_sharding, replicated = parallel.mesh_shardings()
    pad = -examples % jax.device_count()  # Masked rows, so every step has `examples`.
    step = make_eval_step(build_model(model_config, eval_step=True), view)
    variables = jax.device_put(dict(variables), replicated)
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0, "nonfinite": 0.0}
    correct = []
    for images, labels, mask in data.iterate_batches(split, examples):
        if pad:
            images, labels, mask = (
                np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
                for a in (images, labels, mask)
            )
        out = step(variables, *parallel.shard_batch(batch_sharding, images, labels, mask))
        totals = {k: totals[k] + float(out[k]) for k in totals}
        correct.append(_to_host(out["per_example"])[mask > 0])
    if totals["nonfinite"]:
        raise ValueError(
            f"{name or f'model {model_config.name}'} gives NaN or inf logits on "
            f"{int(totals['nonfinite'])} of {int(totals['count'])} examples of {split.source}; "
            "its accuracy would be meaningless (broken weights or input scaling?)"
        )
    return {
        "accuracy": totals["correct"] / totals["count"],
        "loss": totals["loss"] / totals["count"],
        "examples": int(totals["count"]),
        "correct": np.concatenate(correct).astype(bool),
    }


def _examples_per_step(batch_size: int, examples: int) -> int:
    """Examples per step: `batch_size`, at most the split's `examples`, and a multiple of
    the devices when `batch_size` is one. Raises ValueError unless an integer >= 1."""
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if batch_size % jax.device_count() == 0:
        # As before: a multiple of the devices, down to one for a split smaller than it.
        return parallel.round_to_devices(min(batch_size, examples))
    return min(batch_size, examples)


def _to_host(x: jax.Array) -> np.ndarray:
    # Rows of a batch live on every host's devices; each host needs all of them.
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_input(model_config: ModelConfig, split: data.Split, view: str) -> data.Split:
    """Checks that `view` of `split` is what the model takes, and matches the split's
    classes to the model's (`data.match_classes`).

    Returns:
        `split` with labels as the model's class indices: use it, not `split`.

    Raises:
        ValueError: wrong channels or image size, or labels or class names the model does
            not have (naming them and the dataset).
    """
    if model_config.in_channels != transforms.view_channels(view):
        raise ValueError(
            f"view {view!r} gives {transforms.view_channels(view)}-channel input but the model "
            f"takes {model_config.in_channels} channels"
        )
    if view == "color" and split.images.shape[-1] != 3:
        raise ValueError(
            f"{split.source}: view 'color' needs 3-channel images, these have "
            f"{split.images.shape[-1]}; gray images are views 'gray' and 'gray3'"
        )
    if split.images.shape[1:3] != (model_config.image_size,) * 2:
        raise ValueError(
            f"{split.source}: images are {split.images.shape[1:3]} but the model takes "
            f"{model_config.image_size}x{model_config.image_size}"
        )
    return data.match_classes(split, model_config.num_classes, model_config.class_names)
