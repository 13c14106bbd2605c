"""Orbax checkpoints that carry their model config, so any of them loads with no flags.

Every checkpoint this project writes is a CheckpointManager directory whose steps hold
the items `variables` ({'params', 'batch_stats'}), `config` (JSON: {'model': ModelConfig,
...}) and, for training runs, `opt_state`. Orbax writes each step to a temporary
directory and renames it when complete, so a killed run never leaves a half-written step.
"""

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from graycnn.models import ModelConfig

_ITEMS = ("variables", "config", "opt_state")


def manager(directory: str, max_to_keep: int | None = 2) -> ocp.CheckpointManager:
    """A CheckpointManager at `directory` (made absolute, as orbax requires)."""
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        # Saves are waited for anyway; synchronous saves leave no background event loop
        # to be torn down at exit.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
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


def save_model(
    directory: str, model_config: ModelConfig, variables: Mapping[str, Any], **extra: Any
) -> str:
    """Writes a model checkpoint to a new directory; refuses to overwrite one.

    Args:
        directory: Must not exist yet (a user's checkpoint is never overwritten).
        extra: More JSON-serializable entries for the config item.

    Returns:
        The absolute directory.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
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
    """
    step = mngr.latest_step()
    target = jax.device_get({"variables": variables, "opt_state": opt_state})
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(target["variables"]),
            opt_state=ocp.args.StandardRestore(target["opt_state"]),
        ),
    )
    return step, restored["variables"], restored["opt_state"]


def resolve(directory: str) -> str:
    """The CheckpointManager root for a checkpoint dir or a training workdir."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
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
        ValueError: the checkpoint is corrupt or not one of ours.
    """
    root = resolve(directory)
    mngr = manager(root)
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
        model_config = ModelConfig.from_json(config["model"])
        variables = jax.tree.map(np.asarray, dict(restored["variables"]))
    except Exception as e:  # orbax raises many types for truncated or foreign files.
        # Orbax restores leaves in parallel asyncio tasks, and the others are still
        # running when the first fails. Closing the manager now would close their loop
        # under them ("Event loop is closed" tracebacks), and their own errors are
        # logged as "Task exception was never retrieved": both would bury this message.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        raise ValueError(f"checkpoint {root} (step {step}) is corrupt or incomplete: {e}") from e
    mngr.close()
    _check_finite(variables, root)
    return model_config, variables, config


def _check_finite(variables: Mapping[str, Any], where: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(f"{where}: {jax.tree_util.keystr(path)} holds NaN or inf")
