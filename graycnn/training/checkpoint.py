"""Orbax checkpoints that carry their model config, so any of them loads with no flags.

Every checkpoint this project writes is a CheckpointManager directory whose steps hold
the items `variables` ({'params', 'batch_stats'}), `config` (JSON: {'model': ModelConfig,
...}) and, for training runs, `opt_state`. Orbax writes each step to a temporary
directory and renames it when complete, so a killed run never leaves a half-written step.
"""

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from graycnn import graph
from graycnn.models import ModelConfig, build_model
from graycnn.training import data, parallel

_ITEMS = ("variables", "config", "opt_state")


def use_coordination_barriers() -> None:
    """In a multi-process run, makes orbax wait at barriers of JAX's coordination
    service: its default barrier is a jitted all-gather, compiled afresh for every
    barrier (five per CheckpointManager); this one
    needs no compile, and has a timeout."""
    from absl import flags

    flags.FLAGS["experimental_orbax_use_distributed_barrier"].value = True


def manager(
    directory: str, max_to_keep: int | None = 2, read_only: bool = False
) -> ocp.CheckpointManager:
    """A CheckpointManager at `directory` (made absolute, as orbax requires).

    Args:
        read_only: For reading a user's checkpoint: the directory is not created. (Not
            orbax's `read_only`, which logs a warning on every load; a manager that only
            restores writes nothing, tests/test_hostile.py checks it.)
    """
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        # Saves are waited for anyway; synchronous saves leave no background event loop
        # to be torn down at exit.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, enable_async_checkpointing=False
        ),
        item_names=_ITEMS,
    )


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    variables: Mapping[str, Any],
    config: Mapping[str, Any],
    opt_state: Any = None,
) -> None:
    """Saves one step and waits until it is on disk."""
    items = {
        "variables": ocp.args.StandardSave(dict(variables)),
        "config": ocp.args.JsonSave(dict(config)),
    }
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    mngr.save(step, args=ocp.args.Composite(**items))
    mngr.wait_until_finished()


def is_complete(directory: str) -> bool:
    """Whether `directory` holds a finished checkpoint step (a save killed midway leaves
    only orbax's temporary one, which restores nothing)."""
    # A listing, not a CheckpointManager: a manager syncs every process at barriers, and
    # only process 0 asks.
    return os.path.isdir(directory) and bool(ocp.path.step.checkpoint_steps(directory))


def save_model(
    directory: str, model_config: ModelConfig, variables: Mapping[str, Any], **extra: Any
) -> str:
    """Writes a model checkpoint to a new directory; refuses to overwrite one. In a
    multi-process run every process calls it (orbax's barriers), process 0 writes.

    Args:
        directory: Must not exist yet (a user's checkpoint is never overwritten).
        extra: More JSON-serializable entries for the config item.

    Returns:
        The absolute directory.
    """
    directory = os.path.abspath(directory)
    # Process 0's answer: the others could see the directory its save has just made.
    if parallel.from_primary(lambda: os.path.exists(directory)):
        raise FileExistsError(f"refusing to overwrite existing checkpoint {directory}")
    _check_finite(variables, directory)
    mngr = manager(directory, max_to_keep=None)
    save(mngr, 0, jax.device_get(variables), {"model": model_config.to_json(), **extra})
    mngr.close()
    return directory


def restore_training(
    mngr: ocp.CheckpointManager, variables: Any, opt_state: Any
) -> tuple[int, dict[str, Any], Any]:
    """Restores the latest step of a training run onto the given target trees.

    Args:
        variables, opt_state: Trees of the run's structure (optax state needs a target).

    Returns:
        (step, variables, opt_state).

    Raises:
        ValueError: the step is corrupt or does not fit the targets (naming the directory).
    """
    step = mngr.latest_step()
    target = jax.device_get({"variables": variables, "opt_state": opt_state})
    try:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                variables=ocp.args.StandardRestore(target["variables"]),
                opt_state=ocp.args.StandardRestore(target["opt_state"]),
            ),
        )
    except Exception as e:  # orbax raises many types for truncated or foreign files.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # See load_model.
        raise ValueError(
            f"checkpoint {mngr.directory} (step {step}) cannot be resumed: {_short(e)}"
        ) from e
    return step, restored["variables"], restored["opt_state"]


def read_config(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The config item of `step` (JSON), without reading any arrays.

    Raises:
        ValueError: it is missing or unreadable (naming the directory).
    """
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        config = restored["config"]
    except Exception as e:  # orbax raises many types for truncated or foreign files.
        raise ValueError(
            f"checkpoint {mngr.directory} (step {step}) has no readable config: {_short(e)}"
        ) from e
    if not isinstance(config, Mapping):
        raise ValueError(f"checkpoint {mngr.directory} (step {step}): config is not an object")
    return dict(config)


def resolve(directory: str) -> str:
    """The CheckpointManager root for a checkpoint dir or a training workdir."""
    directory = os.path.abspath(directory)
    if not os.path.exists(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint {directory} is a file, not a checkpoint directory")
    nested = os.path.join(directory, "checkpoints")
    return nested if os.path.isdir(nested) else directory


def load_model(
    directory: str, step: int | None = None
) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Loads a checkpoint written by this project.

    Args:
        directory: A checkpoint directory or a training workdir (uses its `checkpoints/`).
        step: A step; default the latest.

    Returns:
        (model config, variables as numpy arrays, the whole config item).

    Raises:
        FileNotFoundError: no such directory, or no complete step in it.
        ValueError: the checkpoint is corrupt or not one of ours, or its variables do not
            fit its config's model (naming the directory and the variable).
    """
    root = resolve(directory)
    mngr = manager(root, read_only=True)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{root} holds no complete checkpoint step")
    try:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                variables=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()
            ),
        )
        config = dict(restored["config"])
        variables = jax.tree.map(np.asarray, dict(restored["variables"]))
    except Exception as e:  # orbax raises many types for truncated or foreign files.
        # Orbax restores leaves in parallel asyncio tasks, and the others are still
        # running when the first fails. Closing the manager now would close their loop
        # under them ("Event loop is closed" tracebacks), and their own errors are
        # logged as "Task exception was never retrieved": both would bury this message.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        raise ValueError(
            f"checkpoint {root} (step {step}) is corrupt or incomplete: {_short(e)}"
        ) from e
    mngr.close()
    model_config = _model_config(config, f"checkpoint {root} (step {step})")
    _check_finite(variables, root)
    try:
        graph.check_variables(build_model(model_config), variables, model_config.input_shape)
    except ValueError as e:
        raise ValueError(
            f"checkpoint {root} (step {step}): its variables do not fit its config's model "
            f"{model_config.name!r}: {e}"
        ) from e
    return model_config, variables, config


def _model_config(config: Mapping[str, Any], where: str) -> ModelConfig:
    """The ModelConfig of a checkpoint's config item.

    Checkpoints trained on CIFAR-10 before class names were stored get its names from
    their training dataset, so named datasets still map onto them by name.
    """
    try:
        model_config = ModelConfig.from_json(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where} has no valid model config: {_short(e)}") from e
    train = config.get("train")
    names = data.known_class_names(train.get("dataset", "")) if isinstance(train, dict) else None
    if not model_config.class_names and names and len(names) == model_config.num_classes:
        model_config = model_config.replace(class_names=names)
    return model_config


def _short(e: Exception, limit: int = 400) -> str:
    """An exception as one readable line: tensorstore appends its whole JSON spec
    ("[tensorstore_spec='{...}']", ~1.5 KB) to every error, which would bury the cause."""
    text = re.sub(r"\s*\[tensorstore_spec='.*?'\]", "", str(e), flags=re.S)
    text = " ".join(text.split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_finite(variables: Mapping[str, Any], where: str) -> None:
    """Refuses NaN or inf anywhere, and a negative BatchNorm variance (`batch_stats`
    leaves named `var`): sqrt(var + eps) of one is NaN, so every logit would be."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        leaf = np.asarray(leaf)
        if not np.all(np.isfinite(leaf)):
            raise ValueError(f"{where}: {jax.tree_util.keystr(path)} holds NaN or inf")
        keys = [getattr(k, "key", None) for k in path]
        if keys[0] == "batch_stats" and keys[-1] == "var" and np.any(leaf < 0):
            raise ValueError(
                f"{where}: {jax.tree_util.keystr(path)} holds {int(np.sum(leaf < 0))} negative "
                f"BatchNorm variances (min {float(leaf.min()):g}); a variance is >= 0"
            )
