"""A jitted train step and a resumable training loop, data parallel over all devices.

The batch is sharded over a 1-D mesh of every device (`graycnn.training.parallel`), parameters
are replicated, and XLA inserts the gradient and BatchNorm all-reduces.
"""

import dataclasses
import math
import numbers
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from graycnn import graph, xla_options
from graycnn.cli import workdir as workdir_lib
from graycnn.config import setting
from graycnn.models import ModelConfig, build_model, check_name, init_variables
from graycnn.training import checkpoint, data, evaluation, metrics_log, parallel, transforms
from graycnn.training.metrics_log import read_history as read_history  # re-exported

Variables = dict[str, Any]
TRAINABLE = ("all", "batchnorm")
LOSSES = ("ce", "kd")  # the labels; a color teacher distilled (plus the labels)
# Settings a resumed run may change: the others must match the run being resumed, or the
# resumed run would silently be a different run (or fail to restore).
_RESUMABLE_CHANGES = ("epochs", "eval_batch_size", "validate", "data_dir")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. The defaults train densenet_tiny on the embedded sample (~56%
    validation accuracy). Every field is also a flag of `experiments.train`.
    """

    model: str = setting("densenet_tiny", "A model of graycnn.models.MODELS.")
    dataset: str = setting("cifar10_sample", data.DATASET_HELP)
    view: str = setting("color", "Input view.", choices=transforms.VIEWS)
    epochs: int = setting(15, "Epochs.")
    batch_size: int = setting(64, "Global batch size.")
    learning_rate: float = setting(0.05, "Initial SGD learning rate.")
    momentum: float = setting(0.9, "SGD momentum.")
    # The study's manual drops 0.01 -> 1e-3 -> 5e-4 -> 1e-4, at 50%, 75% and 90% of steps.
    lr_drops: tuple[tuple[float, float], ...] = setting(
        ((0.5, 0.1), (0.75, 0.5), (0.9, 0.2)),
        "((fraction of training, factor), ...): step drops of the learning rate.",
        flag=False,
    )
    augment: bool = setting(True, "Random crop (4-pixel pad) and horizontal flip.")
    distill: str = setting(
        "ce",
        "'ce': the labels; 'kd': distill a color teacher's softened predictions on the "
        "matching color images (plus the labels); needs a teacher.",
        choices=LOSSES,
        flag=False,
    )
    temperature: float = setting(4.0, "Distillation temperature.", flag=False)
    distill_weight: float = setting(0.9, "Weight of the distillation term.", flag=False)
    trainable: str = setting(
        "all",
        "'all', or 'batchnorm' to train only BN scale and bias (the study's BN re-estimation).",
        choices=TRAINABLE,
        flag=False,
    )
    seed: int = setting(0, "Seed of init, data order and augmentation.")
    eval_batch_size: int = setting(500, "Evaluation batch size.", flag=False)
    validate: bool = setting(
        True, "Evaluate on the validation split after every epoch (its metrics.jsonl "
        "record); off where the caller evaluates the result itself.", flag=False,
    )  # fmt: skip
    data_dir: str | None = setting(None, "TFDS data directory.")

    def __post_init__(self):
        """Raises ValueError naming the flag of the first invalid setting."""
        check_name(self.model)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
        for name in ("learning_rate", "momentum"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"--seed must be in 0..{2**31 - 1}, got {self.seed}")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> Variables:
        return {"params": self.params, "batch_stats": self.batch_stats}


# The step counter (TrainState.step) and the schedule's boundaries are int32.
MAX_STEPS = 2**31 - 1


def stage_batch_size() -> int:
    """The batch of a training stage that has no --batch_size flag (compress's color
    training, BN epochs and fine-tuning): the default batch, cut to a multiple of the
    device count (the same on 1, 2, 4 or 8 devices), which `train_and_evaluate` needs."""
    return parallel.round_to_devices(TrainConfig().batch_size)


def check_epochs(epochs: int, steps_per_epoch: int, flag: str = "--epochs") -> None:
    """Raises ValueError naming `flag` if `epochs` epochs of `steps_per_epoch` steps
    overflow the int32 step counter (jit then fails with an OverflowError)."""
    if epochs * steps_per_epoch > MAX_STEPS:
        raise ValueError(
            f"{flag}={epochs} is {epochs * steps_per_epoch} steps ({steps_per_epoch} per "
            f"epoch); the step counter holds at most {MAX_STEPS}"
        )


def make_optimizer(
    config: TrainConfig, steps_per_epoch: int, labels: Any = None
) -> optax.GradientTransformation:
    """SGD with momentum and step decay.

    Args:
        labels: For trainable='batchnorm', 'train'/'freeze' per param (see
            `graph.ChannelGraph.batchnorm_labels`); every 'freeze' param stays as is.
    """
    total = max(1, config.epochs * steps_per_epoch)
    schedule = optax.piecewise_constant_schedule(
        config.learning_rate, {int(f * total): s for f, s in config.lr_drops}
    )
    sgd = optax.sgd(schedule, momentum=config.momentum)
    if config.trainable == "all":
        return sgd
    if config.trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {config.trainable!r}")
    return optax.multi_transform({"train": sgd, "freeze": optax.set_to_zero()}, labels)


def make_train_step(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    view: str,
    augment: bool,
    teacher: Callable | None = None,
    temperature: float = 4.0,
    distill_weight: float = 0.9,
    kernel_gradients: bool = True,
) -> Callable:
    """Returns jitted step(state, images uint8 (B,H,W,C), labels (B,), rng, teacher_vars)
    -> (state, metrics).

    Args:
        teacher: For distillation, f(teacher_vars, images (B,H,W,C) float) -> logits
            (B, classes) on the color view; it sees the same crops and flips as the
            student (the same rng), so its targets match the student's images.
        temperature, distill_weight: Of the distillation loss (`_loss`).
        kernel_gradients: False when `tx` freezes every conv (BN-only training): the
            step then compiles for convolutions without kernel gradients, which on CPU
            run faster on YNNPACK (`xla_options.train_compiler_options`).
    """

    def step(state: TrainState, images, labels, rng, teacher_vars=None):
        x = transforms.apply_view(images, view)
        if augment:
            x = transforms.augment(rng, x)
        targets = None
        if teacher is not None:
            color = transforms.apply_view(images, "color")
            targets = teacher(teacher_vars, transforms.augment(rng, color) if augment else color)

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = _loss(logits, labels, targets, temperature, distill_weight)
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(  # type: ignore[attr-defined]  # flax.struct adds it
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return new_state, {"loss": loss, "accuracy": accuracy}

    options = xla_options.train_compiler_options(kernel_gradients)
    return jax.jit(step, donate_argnums=0, compiler_options=options)


def _loss(logits, labels, targets, temperature: float, distill_weight: float) -> jax.Array:
    """Mean cross-entropy with the labels; with the teacher's logits `targets`,
    distill_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) +
    (1 - distill_weight) * that cross-entropy (Hinton et al. 2015)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    if targets is not None:
        soft = optax.softmax_cross_entropy(
            logits / temperature, jax.nn.softmax(targets / temperature)
        ) - optax.softmax_cross_entropy(
            targets / temperature, jax.nn.softmax(targets / temperature)
        )  # KL = cross-entropy - the teacher's entropy
        kd = temperature**2 * soft.mean()
        loss = distill_weight * kd + (1 - distill_weight) * loss
    return loss


def train_and_evaluate(
    config: TrainConfig,
    workdir: str,
    init: tuple[ModelConfig, Variables] | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    teacher: tuple[ModelConfig, Mapping[str, Any]] | None = None,
) -> tuple[ModelConfig, Variables, list[dict[str, Any]]]:
    """Trains, evaluating every epoch; resumes from `workdir/checkpoints` if present.

    Args:
        config: The run.
        workdir: Checkpoints and `metrics.jsonl` go here.
        init: Start from these weights (fine-tuning) instead of a fresh init.
        model_overrides: ModelConfig fields (e.g. widths) for a fresh init.
        teacher: The color model whose predictions config.distill='kd' distills.

    Returns:
        (model config, final variables, one metrics dict per epoch of this process's run).

    Raises:
        ValueError: `workdir` holds a model checkpoint or another command's run, or
            another process is writing it (see `workdir.claim`); bad settings or data.
    """
    parallel.check_batch_size(config.batch_size)  # Before the workdir exists.
    with workdir_lib.claim(workdir, "train"):
        return _train_and_evaluate(config, workdir, init, model_overrides, teacher)


def _train_and_evaluate(config, workdir, init, model_overrides, teacher):
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
    resumed = None
    if mngr.latest_step() is not None:
        resumed = checkpoint.read_config(mngr, mngr.latest_step())
        workdir_lib.check_resumable(config, resumed, workdir, _RESUMABLE_CHANGES)
    model_config, variables, train_split, val_split = _model_and_data(config, init, model_overrides)
    if resumed is not None:
        workdir_lib.check_same_model(model_config, resumed, workdir)
    batch_size = config.batch_size  # A multiple of the device count (checked above).
    steps_per_epoch = len(train_split) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch_size={batch_size} exceeds the {len(train_split)} train images")
    check_epochs(config.epochs, steps_per_epoch)
    model = build_model(model_config)
    state, tx = _initial_state(config, model, model_config, variables, steps_per_epoch)
    if resumed is not None:
        state = _restore(mngr, state)
    batch_sharding, replicated = parallel.mesh_shardings()
    state = jax.device_put(state, replicated)
    teacher_fn, teacher_vars = _teacher(config, teacher, replicated)
    train_step = make_train_step(
        model, tx, config.view, config.augment, teacher_fn, config.temperature,
        config.distill_weight, kernel_gradients=config.trainable == "all",
    )  # fmt: skip
    base_rng = jax.random.key(config.seed + 1)

    def run_step(state, step, images, labels):
        batch = parallel.shard_batch(batch_sharding, images, labels)
        return train_step(state, *batch, jax.random.fold_in(base_rng, step), teacher_vars)

    history = []
    first_epoch = int(state.step) // steps_per_epoch
    if jax.process_index() == 0:
        metrics_log.keep_epochs(workdir, first_epoch)
    for epoch in range(first_epoch, config.epochs):
        batches = data.iterate_batches(
            train_split, batch_size, seed=config.seed * 100_003 + epoch, drop_remainder=True
        )
        state, record = _train_epoch(config, epoch, state, run_step, batches, steps_per_epoch)
        _end_epoch(config, workdir, mngr, model_config, state, val_split, record)
        history.append(record)
    mngr.close()
    return model_config, jax.device_get(state.variables), history


def _train_epoch(config, epoch, state, run_step, batches, steps_per_epoch):
    """(state, the epoch's metrics record) after `run_step(state, global step, images,
    labels) -> (state, metrics)` on each of `batches`; validation is left to `_end_epoch`."""
    start = time.perf_counter()
    sums = {"loss": 0.0, "accuracy": 0.0}
    bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
               mininterval=1.0, leave=False)  # fmt: skip
    for i, (images, labels, _) in enumerate(bar):
        state, metrics = run_step(state, epoch * steps_per_epoch + i, images, labels)
        if i % 10 == 0 or i == steps_per_epoch - 1:
            metrics = jax.device_get(metrics)
            rate = (i + 1) * config.batch_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                            img_s=f"{rate:.0f}")  # fmt: skip
        # Summing device scalars keeps the host from waiting on every step.
        sums = {k: sums[k] + metrics[k] for k in sums}
    seconds = time.perf_counter() - start
    record = {
        "epoch": epoch + 1,
        "step": int(state.step),
        "train_loss": float(sums["loss"]) / steps_per_epoch,
        "train_accuracy": float(sums["accuracy"]) / steps_per_epoch,
        "val_accuracy": None,
        "val_loss": None,
        "images_per_sec": steps_per_epoch * config.batch_size / seconds,
        "epoch_seconds": seconds,
    }
    return state, record


def _model_and_data(config: TrainConfig, init, model_overrides):
    """(model config, variables, train split, validation split), the splits' labels
    matched to the model's classes: a mismatch stops the run before any training."""
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
            class_names=train_split.class_names or (),
            **(model_overrides or {}),
        )
        variables = init_variables(model_config, jax.random.key(config.seed))
    train_split = evaluation.check_input(model_config, train_split, config.view)
    if len(val_split):
        val_split = evaluation.check_input(model_config, val_split, config.view)
    else:
        tqdm.write(
            f"note: the validation split of {config.dataset} is empty (under 3 images per "
            "class); epochs are not validated"
        )
    return model_config, variables, train_split, val_split


def _initial_state(config, model, model_config, variables, steps_per_epoch):
    """(TrainState, optimizer); BN-only training freezes what the channel graph does not
    call a BatchNorm."""
    bn_labels = None
    if config.trainable == "batchnorm":
        g = graph.trace(model, variables, model_config.input_shape)
        bn_labels = g.batchnorm_labels(variables["params"])
    tx = make_optimizer(config, steps_per_epoch, bn_labels)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(variables["params"]),
    )
    return state, tx


def _restore(mngr, state: TrainState) -> TrainState:
    step, restored, opt_state = checkpoint.restore_training(mngr, state.variables, state.opt_state)
    tqdm.write(f"resuming from {mngr.directory} step {step}")
    return state.replace(  # type: ignore[attr-defined]  # flax.struct adds it
        step=jnp.asarray(step, jnp.int32),
        params=restored["params"],
        batch_stats=restored["batch_stats"],
        opt_state=opt_state,
    )


def _teacher(config: TrainConfig, teacher, replicated):
    """(logits function, replicated variables) of the distillation teacher, or Nones."""
    if config.distill != "kd":
        return None, None
    if teacher is None or teacher[0].in_channels != 3:
        raise ValueError("distill='kd' needs a color teacher model")
    teacher_model = build_model(teacher[0])
    fn = lambda v, x: teacher_model.apply(v, x, train=False)  # noqa: E731
    return fn, jax.device_put(dict(teacher[1]), replicated)


def _end_epoch(config, workdir, mngr, model_config, state, val_split, record) -> None:
    """Validates, then logs and checkpoints the epoch: a finished epoch is logged and
    saved even if its validation fails."""
    try:
        if config.validate and len(val_split):
            val = evaluation.evaluate(
                model_config, state.variables, val_split, config.view, config.eval_batch_size
            )
            record.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
    finally:
        if jax.process_index() == 0:
            metrics_log.append(workdir, record)
        checkpoint.save(
            mngr,
            int(state.step),
            jax.device_get(state.variables),
            {"model": model_config.to_json(), "train": dataclasses.asdict(config), **record},
            opt_state=jax.device_get(state.opt_state),
        )
    val_text = "-" if record["val_accuracy"] is None else f"{record['val_accuracy']:.4f}"
    tqdm.write(
        f"epoch {record['epoch']}/{config.epochs}: loss {record['train_loss']:.3f} "
        f"train acc {record['train_accuracy']:.3f} val acc {val_text} "
        f"({record['images_per_sec']:.0f} img/s)"
    )
