"""Pure jitted train and eval steps, data parallel over all devices, with resumable
orbax checkpoints.

Data parallelism: the batch is sharded over a 1-D mesh of every device (of every host,
after `jax.distributed.initialize()`), parameters are replicated, and XLA inserts the
gradient and BatchNorm all-reduces. Each host feeds only its own slice of each batch.
"""

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from graycnn import checkpoint, data, runtime
from graycnn.models import ModelConfig, build_model, init_variables

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. The defaults train densenet_tiny on the embedded sample (~4.5 min on
    2 CPU cores, ~56% validation accuracy).

    Attributes:
        lr_drops: ((fraction of training, factor), ...): the study's manual drops
            0.01 -> 1e-3 -> 5e-4 -> 1e-4, placed at 50%, 75% and 90% of the steps.
        trainable: 'all', or 'batchnorm' to train only BN scale and bias (the study's
            BN re-estimation).
    """

    model: str = "densenet_tiny"
    dataset: str = "cifar10_sample"
    view: str = "color"
    epochs: int = 15
    batch_size: int = 64
    learning_rate: float = 0.05
    momentum: float = 0.9
    lr_drops: tuple[tuple[float, float], ...] = ((0.5, 0.1), (0.75, 0.5), (0.9, 0.2))
    augment: bool = True
    trainable: str = "all"
    seed: int = 0
    eval_batch_size: int = 500
    data_dir: str | None = None


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> Variables:
        return {"params": self.params, "batch_stats": self.batch_stats}


def make_optimizer(
    config: TrainConfig, steps_per_epoch: int, params: Any
) -> optax.GradientTransformation:
    """SGD with momentum and step decay; BN-only training freezes every other param."""
    total = max(1, config.epochs * steps_per_epoch)
    schedule = optax.piecewise_constant_schedule(
        config.learning_rate, {int(f * total): s for f, s in config.lr_drops}
    )
    sgd = optax.sgd(schedule, momentum=config.momentum)
    if config.trainable == "all":
        return sgd
    if config.trainable != "batchnorm":
        raise ValueError(f"trainable must be 'all' or 'batchnorm', got {config.trainable!r}")
    return optax.multi_transform(
        {"train": sgd, "freeze": optax.set_to_zero()}, batchnorm_labels(params)
    )


def batchnorm_labels(params: Any) -> Any:
    """'train' for BatchNorm scale and bias, 'freeze' for the rest, as a tree like params."""

    def label(path, _):
        names = [getattr(k, "key", str(k)) for k in path]
        return "train" if names[-2:-1] and _is_bn(names[-2]) else "freeze"

    return jax.tree_util.tree_map_with_path(label, params)


def _is_bn(module_name: str) -> bool:
    return module_name == "bn" or module_name.startswith("BatchNorm")


def make_train_step(
    model: flax.linen.Module, tx: optax.GradientTransformation, view: str, augment: bool
) -> Callable:
    """Returns jitted step(state, images uint8 (B,H,W,C), labels (B,), rng) -> (state, metrics)."""

    def step(state: TrainState, images, labels, rng):
        x = data.apply_view(images, view)
        if augment:
            x = data.augment(rng, x)

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return new_state, {"loss": loss, "accuracy": accuracy}

    return jax.jit(step, donate_argnums=0, compiler_options=runtime.train_compiler_options())


@functools.lru_cache(maxsize=32)
def make_eval_step(model: flax.linen.Module, view: str) -> Callable:
    """Returns jitted step(variables, images, labels, mask) -> sums of correct, loss, count.

    Cached: `evaluate` runs every epoch and for every report row, and a fresh jit of a
    fresh closure would trace and compile again each time. Modules hash by value.
    """

    def step(variables, images, labels, mask):
        logits = model.apply(variables, data.apply_view(images, view), train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return {
            "correct": jnp.sum(correct * mask),
            "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask),
        }

    return jax.jit(step)


def mesh_shardings() -> tuple[NamedSharding, NamedSharding]:
    """(batch sharding over every device, replicated sharding)."""
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    return NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())


def shard_batch(sharding: NamedSharding, *arrays: np.ndarray) -> list[jax.Array]:
    """Places global-batch host arrays on the mesh; each process sends only its slice."""
    n, i = jax.process_count(), jax.process_index()
    out = []
    for a in arrays:
        if len(a) % jax.device_count():
            raise ValueError(
                f"batch size {len(a)} must be divisible by the {jax.device_count()} devices"
            )
        local = a[i * len(a) // n : (i + 1) * len(a) // n]
        out.append(jax.make_array_from_process_local_data(sharding, local, a.shape))
    return out


def evaluate(
    model_config: ModelConfig,
    variables: Mapping[str, Any],
    split: data.Split,
    view: str,
    batch_size: int = 500,
) -> dict[str, float]:
    """Accuracy and mean loss of a model on a split, every example counted once.

    Returns:
        {'accuracy': 0..1, 'loss': float, 'examples': int}.
    """
    _check_channels(model_config, split, view)
    batch_sharding, replicated = mesh_shardings()
    batch_size = _round_to_devices(min(batch_size, len(split)))
    step = make_eval_step(build_model(model_config), view)
    variables = jax.device_put(dict(variables), replicated)
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for images, labels, mask in data.iterate_batches(split, batch_size):
        out = step(variables, *shard_batch(batch_sharding, images, labels, mask))
        totals = {k: totals[k] + float(out[k]) for k in totals}
    return {
        "accuracy": totals["correct"] / totals["count"],
        "loss": totals["loss"] / totals["count"],
        "examples": int(totals["count"]),
    }


def train_and_evaluate(
    config: TrainConfig,
    workdir: str,
    init: tuple[ModelConfig, Variables] | None = None,
    model_overrides: Mapping[str, Any] | None = None,
) -> tuple[ModelConfig, Variables, list[dict[str, Any]]]:
    """Trains, evaluating every epoch; resumes from `workdir/checkpoints` if present.

    Args:
        config: The run.
        workdir: Checkpoints and `metrics.jsonl` go here.
        init: Start from these weights (fine-tuning) instead of a fresh init.
        model_overrides: ModelConfig fields (e.g. widths) for a fresh init.

    Returns:
        (model config, final variables, one metrics dict per epoch of this process's run).
    """
    train_split = data.load_dataset(config.dataset, "train", config.data_dir)
    val_split = data.load_dataset(config.dataset, "validation", config.data_dir)
    if init is not None:
        model_config, variables = init
    else:
        model_config = ModelConfig(
            config.model,
            in_channels=data.view_channels(config.view),
            num_classes=train_split.num_classes,
            image_size=train_split.images.shape[1],
            **(model_overrides or {}),
        )
        variables = init_variables(model_config, jax.random.key(config.seed))
    _check_channels(model_config, train_split, config.view)
    batch_size = _round_to_devices(config.batch_size)
    steps_per_epoch = len(train_split) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch_size={batch_size} exceeds the {len(train_split)} train images")
    model = build_model(model_config)
    tx = make_optimizer(config, steps_per_epoch, variables["params"])
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(variables["params"]),
    )
    os.makedirs(workdir, exist_ok=True)
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
    if mngr.latest_step() is not None:
        state = _restore(mngr, state)
    batch_sharding, replicated = mesh_shardings()
    state = jax.device_put(state, replicated)
    train_step = make_train_step(model, tx, config.view, config.augment)
    base_rng = jax.random.key(config.seed + 1)
    history = []
    first_epoch = int(state.step) // steps_per_epoch
    for epoch in range(first_epoch, config.epochs):
        start = time.perf_counter()
        bar = tqdm(
            data.iterate_batches(
                train_split, batch_size, seed=config.seed * 100_003 + epoch, drop_remainder=True
            ),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            mininterval=1.0,
            leave=False,
        )
        sums = {"loss": 0.0, "accuracy": 0.0}
        for i, (images, labels, _) in enumerate(bar):
            rng = jax.random.fold_in(base_rng, epoch * steps_per_epoch + i)
            state, metrics = train_step(state, *shard_batch(batch_sharding, images, labels), rng)
            if i % 10 == 0 or i == steps_per_epoch - 1:
                metrics = jax.device_get(metrics)
                rate = (i + 1) * batch_size / (time.perf_counter() - start)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    acc=f"{metrics['accuracy']:.3f}",
                    img_s=f"{rate:.0f}",
                )
            # Summing device scalars keeps the host from waiting on every step.
            sums = {k: sums[k] + metrics[k] for k in sums}
        seconds = time.perf_counter() - start
        val = evaluate(
            model_config, state.variables, val_split, config.view, config.eval_batch_size
        )
        record = {
            "epoch": epoch + 1,
            "step": int(state.step),
            "train_loss": float(sums["loss"]) / steps_per_epoch,
            "train_accuracy": float(sums["accuracy"]) / steps_per_epoch,
            "val_accuracy": val["accuracy"],
            "val_loss": val["loss"],
            "images_per_sec": steps_per_epoch * batch_size / seconds,
            "epoch_seconds": seconds,
        }
        history.append(record)
        tqdm.write(
            f"epoch {epoch + 1}/{config.epochs}: loss {record['train_loss']:.3f} "
            f"train acc {record['train_accuracy']:.3f} val acc {val['accuracy']:.4f} "
            f"({record['images_per_sec']:.0f} img/s)"
        )
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        checkpoint.save(
            mngr,
            int(state.step),
            jax.device_get(state.variables),
            {"model": model_config.to_json(), "train": dataclasses.asdict(config), **record},
            opt_state=jax.device_get(state.opt_state),
        )
    mngr.close()
    return model_config, jax.device_get(state.variables), history


def _restore(mngr: ocp.CheckpointManager, state: TrainState) -> TrainState:
    step = mngr.latest_step()
    target = jax.device_get({"variables": state.variables, "opt_state": state.opt_state})
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(target["variables"]),
            opt_state=ocp.args.StandardRestore(target["opt_state"]),
        ),
    )
    tqdm.write(f"resuming from {mngr.directory} step {step}")
    return state.replace(
        step=jnp.asarray(step, jnp.int32),
        params=restored["variables"]["params"],
        batch_stats=restored["variables"]["batch_stats"],
        opt_state=restored["opt_state"],
    )


def _round_to_devices(batch_size: int) -> int:
    n = jax.device_count()
    return max(n, batch_size // n * n)


def _check_channels(model_config: ModelConfig, split: data.Split, view: str) -> None:
    if model_config.in_channels != data.view_channels(view):
        raise ValueError(
            f"view {view!r} gives {data.view_channels(view)}-channel input but the model "
            f"takes {model_config.in_channels} channels"
        )
    if split.images.shape[1:3] != (model_config.image_size,) * 2:
        raise ValueError(
            f"images are {split.images.shape[1:3]} but the model takes "
            f"{model_config.image_size}x{model_config.image_size}"
        )
