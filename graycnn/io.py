"""Atomic file writes: a reader (or a killed run) never sees half a file."""

import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> str:
    """Calls `write(file)` on a temp file beside `path`, then renames it over `path`.

    Returns:
        The path written.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only.
        os.replace(tmp, path)  # Atomic on one filesystem.
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> str:
    return write_atomically(path, lambda f: f.write(text.encode()))


def write_json(path: str | os.PathLike, obj: Any) -> str:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def save_figure(figure: Any, path: str | os.PathLike, dpi: float = 100) -> str:
    """Writes a matplotlib Figure as PNG, atomically, without pyplot (no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    return write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=dpi))
