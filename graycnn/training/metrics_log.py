"""A training run's per-epoch metrics: `metrics.jsonl` in its workdir, one JSON record a
line, rewritten whole on every change so that a kill mid-write leaves the old file."""

import json
import os
from typing import Any

from graycnn import io

FILENAME = "metrics.jsonl"


def read_history(workdir: str) -> list[dict[str, Any]]:
    """Every epoch's metrics of the run in `workdir`, resumed parts included."""
    path = os.path.join(workdir, FILENAME)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append(workdir: str, record: dict[str, Any]) -> None:
    """Logs one epoch's `record` after those already logged."""
    _write(workdir, [*_logged(workdir), record])


def keep_epochs(workdir: str, epochs: int) -> None:
    """Drops the metrics of epochs after the first `epochs` (a run killed after logging
    an epoch but before its checkpoint was saved trains that epoch again, and logs it
    again), and any line that is not a record."""
    if os.path.exists(os.path.join(workdir, FILENAME)):
        _write(workdir, [r for r in _logged(workdir) if r.get("epoch", 0) <= epochs])


def _logged(workdir: str) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a line that is not one (half a line, appended by a
    run killed mid-write before the file was written atomically) is dropped."""
    path = os.path.join(workdir, FILENAME)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _write(workdir: str, records: list[dict[str, Any]]) -> None:
    # Rewritten whole and renamed into place: a kill mid-write leaves the old file.
    io.write_text(os.path.join(workdir, FILENAME), "".join(json.dumps(r) + "\n" for r in records))
