"""A run's directory: writable before any work, and resumed only by the same run."""

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from graycnn.models import ModelConfig


def prepare(workdir: str, flag: str = "--workdir") -> None:
    """Makes `workdir` and proves it writable, so a bad one fails before any work.

    Args:
        flag: How the error names the directory (the flag that gave it).

    Raises:
        ValueError: naming the directory: it is a file, or cannot be made or written.
    """
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path} is not writable ({e.strerror or e})") from e


def check_resumable(
    config: Any, stored: Mapping[str, Any], workdir: str, may_change: Iterable[str] = ()
) -> None:
    """Raises ValueError, naming the flags, if `config` (a config dataclass) is not the
    run stored in `workdir`; the fields in `may_change` may differ."""
    before = stored.get("train")
    if not isinstance(before, Mapping):
        return
    # Through JSON, as the stored config went: tuples become lists.
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    flags = {f.name: f.metadata.get("flag", False) for f in dataclasses.fields(config)}
    differ = [
        f"{'--' if flags[name] else ''}{name}={value!r} (the run has {before[name]!r})"
        for name, value in now.items()
        if name not in may_change and name in before and before[name] != value
    ]
    if differ:
        raise ValueError(
            f"{os.path.abspath(workdir)} holds a run with other settings: {'; '.join(differ)}. "
            "Resume it with its settings, or use a new --workdir"
        )


def check_same_model(model_config: ModelConfig, stored: Mapping[str, Any], workdir: str) -> None:
    """Raises ValueError if the model to train is not the one checkpointed in `workdir`."""
    try:
        before = ModelConfig.from_json(stored["model"]).to_json()
    except (KeyError, TypeError, ValueError):
        return  # Not ours to compare: restoring it will name what is wrong.
    now = model_config.to_json()
    if not before["class_names"]:  # Written before class names were stored.
        now["class_names"] = []
    differ = [f"{k} {now[k]!r} (the run has {before[k]!r})" for k in now if now[k] != before[k]]
    if differ:
        raise ValueError(
            f"{os.path.abspath(workdir)} holds a run of another model: {'; '.join(differ)}. "
            "Resume it with its dataset and settings, or use a new --workdir"
        )
