"""BatchNorm re-estimation after a fold or merge: `recalibrate`, `train` or `none`.

`recalibrate` re-estimates the running statistics from forward passes in train mode,
with no gradients. Flax updates running stats as m * old + (1 - m) * batch; we instead
average the batch statistics exactly over the batches (as PyTorch does with
momentum=None), so the result does not depend on m or on the old statistics. m itself is
read off one probe pass, so this works for any Flax model's BatchNorm.

`train` is the study's method: only BN scale and bias are trained (running statistics
update as usual), one epoch of SGD with momentum 0.7 at `learning_rate` (default the
study's 0.01; compress passes its --bn_lr, 0.1, which recovers more in the epoch's few steps).
"""

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from graycnn.models import ModelConfig, build_model
from graycnn.training import data, evaluation, parallel, train, transforms

METHODS = ("recalibrate", "train", "none")


# recalibrate's batch: the fewest training images a recalibration needs.
RECALIBRATE_BATCH = 128


def recalibrate(
    model_config: ModelConfig,
    variables: Mapping[str, Any],
    split: data.Split,
    view: str,
    *,
    num_batches: int = 50,
    batch_size: int = RECALIBRATE_BATCH,
    seed: int = 0,
    augment: bool = True,
) -> dict[str, Any]:
    """Returns variables whose `batch_stats` are the mean batch statistics of
    `num_batches` shuffled training batches; params unchanged.

    Args:
        augment: Use the training augmentation, whose statistics (zero-padded crops) the
            network was trained with.
    """
    split = evaluation.check_input(model_config, split, view)
    batch_sharding, replicated = parallel.mesh_shardings()
    params = jax.device_put(variables["params"], replicated)
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    step, momenta = _stats_step(build_model(model_config), view, augment)

    def updated_stats(batch_stats, images, rng):
        return step(params, batch_stats, images, rng)

    batches = data.iterate_batches(split, batch_size, seed=seed, drop_remainder=True)
    total, count, momentum = None, 0, momenta.get(replicated)
    for images, _, _ in tqdm(batches, total=num_batches, desc="recalibrate BN", leave=False):
        if count == num_batches:
            break
        (images,) = parallel.shard_batch(batch_sharding, images)
        rng = jax.random.fold_in(jax.random.key(seed), count)
        # Waited for one at a time: each pass all-reduces over the devices, and on a CPU
        # split into host devices two independent passes in flight can each hold one
        # of the few executor threads at the all-reduce, waiting for its other half,
        # which then never runs (seen as XLA's "waiting for all reduce ... may be stuck").
        from_zeros = jax.block_until_ready(updated_stats(zeros, images, rng))
        if momentum is None:
            # ones in: m + (1 - m) * batch statistic, so m is the difference. It is the
            # architecture's, whatever the weights and images: read once per model.
            ones = jax.tree.map(jnp.ones_like, zeros)
            ones_in = jax.block_until_ready(updated_stats(ones, images, rng))
            momentum = momenta[replicated] = jax.tree.map(jnp.subtract, ones_in, from_zeros)
        batch = jax.tree.map(lambda z, m: z / (1 - m), from_zeros, momentum)
        total = batch if total is None else jax.tree.map(jnp.add, total, batch)
        count += 1
    if count == 0:
        raise ValueError(f"recalibration needs at least one batch of {batch_size} images")
    stats = jax.tree.map(lambda t: np.asarray(t / count), total)
    return {**variables, "batch_stats": stats}


@functools.lru_cache(maxsize=32)
def _stats_step(model: Any, view: str, augment: bool) -> tuple[Callable, dict]:
    """Jitted (params, batch_stats, images, rng) -> the running statistics after one
    train-mode pass, and a dict for its BatchNorm momenta, {replicated sharding: tree}
    (`recalibrate` fills it). Cached per architecture, with the weights as arguments: a
    closure over them would bake them into the program as constants and compile it anew
    for every model (each merge, control and seed)."""

    def step(params, batch_stats, images, rng):
        x = transforms.apply_view(images, view)
        if augment:
            x = transforms.augment(rng, x)
        _, state = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return state["batch_stats"]

    return jax.jit(step), {}


def reestimate(
    method: str,
    model_config: ModelConfig,
    variables: Mapping[str, Any],
    *,
    dataset: str,
    view: str,
    workdir: str,
    seed: int = 0,
    epochs: int = 1,
    learning_rate: float = 0.01,
    momentum: float = 0.7,
    num_batches: int = 50,
    data_dir: str | None = None,
    teacher: tuple[ModelConfig, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Re-estimates BatchNorm by `method` ('recalibrate', 'train' or 'none').

    Args:
        workdir: For 'train', its checkpoints (a rerun resumes or reuses them).
        teacher: For 'train', a color model whose softened predictions on the matching
            color images are distilled (`train.TrainConfig.distill='kd'`); None: labels.
    """
    if method not in METHODS:
        raise ValueError(f"unknown BN method {method!r}; methods: {METHODS}")
    if method == "none":
        return dict(variables)
    if method == "recalibrate":
        split = data.load_dataset(dataset, "train", data_dir)
        return recalibrate(model_config, variables, split, view, num_batches=num_batches, seed=seed)
    config = dataclasses.replace(
        train.TrainConfig(),
        model=model_config.name,
        dataset=dataset,
        view=view,
        epochs=epochs,
        batch_size=train.stage_batch_size(),
        learning_rate=learning_rate,
        momentum=momentum,
        lr_drops=(),
        trainable="batchnorm",
        distill="ce" if teacher is None else "kd",
        validate=False,  # every caller evaluates the re-estimated model itself
        seed=seed,
        data_dir=data_dir,
    )
    _, trained, _ = train.train_and_evaluate(
        config,
        os.path.join(workdir, "bn_train"),
        init=(model_config, dict(variables)),
        teacher=teacher,
    )
    return trained
