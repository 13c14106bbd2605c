"""A run's directory: writable before any work, written by one run at a time (`claim`),
never another command's or a model checkpoint, and resumed only by the same run."""

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax

from graycnn.models import ModelConfig

# The directories `prepare` made in this process: (directory, the outermost of the
# parents it made with it), for `remove_unused`.
_made: list[tuple[str, str]] = []


def prepare(workdir: str, flag: str = "--workdir") -> None:
    """Makes `workdir` and proves it writable, so a bad one fails before any work.

    A CLI that then fails on an input error removes it again if nothing was written
    (`remove_unused`, from `runtime.run`).

    Args:
        flag: How the error names the directory (the flag that gave it).

    Raises:
        ValueError: naming the directory: it is a file, or cannot be made or written.
    """
    path = _make(workdir, flag)
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path} is not writable ({e.strerror or e})") from e


def _make(workdir: str, flag: str) -> str:
    """`prepare` without the probe: makes the directory; returns it absolute."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a directory")
    try:
        if not os.path.exists(path):
            top = _outermost_missing(path)
            os.makedirs(path, exist_ok=True)
            _made.append((path, top))
    except OSError as e:
        raise ValueError(f"{flag} {path} is not writable ({e.strerror or e})") from e
    return path


def remove_unused() -> None:
    """Removes every directory `prepare` made in this process that holds no file yet,
    with the parents it made: an input error or Ctrl-C that stops a command before it
    wrote anything leaves no directory behind."""
    while _made:
        path, top = _made.pop()
        if os.path.isdir(path) and not any(files for _, _, files in os.walk(path)):
            shutil.rmtree(path, ignore_errors=True)
            _remove_parents(path, top)


def _outermost_missing(path: str) -> str:
    """The outermost directory that making `path` makes (`path` itself, or a parent)."""
    top = path
    while not os.path.exists(os.path.dirname(top)):
        top = os.path.dirname(top)
    return top


def _remove_parents(path: str, top: str) -> None:
    """Removes the parents of `path` up to `top` while they are empty."""
    parent = os.path.dirname(path)
    while parent.startswith(top + os.sep) or parent == top:
        try:
            os.rmdir(parent)  # only if empty: another run may have used it since
        except OSError:
            break
        parent = os.path.dirname(parent)


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


LOCK = ".lock"
# Orbax step directories ("0", "12", and "3.orbax-checkpoint-tmp-..." while one is being
# written): a directory holding one at its top is a model checkpoint.
_STEP = re.compile(r"^\d+(\.orbax-checkpoint-tmp.*)?$")
# The directories this process has claimed (absolute path -> lock fd, or None where
# another process of a multi-host run holds the lock).
_held: dict[str, int | None] = {}


def holds(path: str) -> str | None:
    """What `path` holds, read without writing: the command whose run it is ('train',
    'compress', 'baselines'), 'checkpoint' for a model checkpoint, or None (nothing of
    ours: a new or empty directory, or other files).

    A run claimed by `claim` names its command in its lock file; a run from before the
    lock existed is told by its files.
    """
    try:
        names = set(os.listdir(path))
    except OSError:
        return None
    try:
        with open(os.path.join(path, LOCK)) as f:
            command = json.loads(f.read() or "null")["command"]
        if isinstance(command, str):
            return command
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no lock file, or one being written: told by the files below
    if any(_STEP.match(n) and os.path.isdir(os.path.join(path, n)) for n in names):
        return "checkpoint"
    if "run.json" in names:
        return "compress"
    if "checkpoints" in names or "metrics.jsonl" in names:
        return "train"
    if "report.json" in names:  # compress writes run.json first, so this is baselines
        return "baselines"
    return None


@contextlib.contextmanager
def claim(workdir: str, command: str, flag: str = "--workdir") -> Iterator[str]:
    """Makes `workdir` this run's own while the block runs: refuses a directory that
    holds something else, and locks it against a second writer.

    The lock is `fcntl.flock` on `workdir/.lock`, so a killed run leaves no stale lock
    (the kernel drops it with the process); the file stays, naming the command, so a
    later run of another command is refused. Nested claims (a train run inside a
    compress workdir) are free: the outermost claim covers them. In a multi-host run only
    process 0 locks (every process writes through it); all of them check.

    On an exception, a directory this claim made that holds nothing but empty
    directories is removed (an input error leaves no workdir behind).

    Args:
        command: The writer ('train', 'compress', 'baselines'); a directory holding
            another command's run, or a model checkpoint, is refused.
        flag: How the errors name the directory.

    Yields:
        The absolute directory.

    Raises:
        ValueError: naming the directory and `flag`: it is a file, not writable, holds
            a model checkpoint or another command's run, or another process holds it.
    """
    path = os.path.abspath(workdir)
    if any(path == p or path.startswith(p + os.sep) for p in _held):
        yield path
        return
    _check_holds(path, command, flag)
    created = not os.path.exists(path)
    top = _outermost_missing(path)  # prepare makes the parents too
    fd, before = None, set()
    if jax.process_index() == 0:
        _make(path, flag)  # probed below, under the lock: a failing run may remove it
        try:
            before = set(os.listdir(path))
        except FileNotFoundError:  # removed meanwhile by a failing run: made again below
            created = True
        fd, remade = _lock(path, command, flag)
        created |= remade
    try:
        prepare(path, flag)  # under the lock: no failing run removes it meanwhile
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    _held[path] = fd
    try:
        yield path
    except BaseException:
        if fd is not None:
            _remove_if_unused(path, None if created else before, top)
        raise
    finally:
        del _held[path]
        if fd is not None:
            os.close(fd)  # releases the lock


def _check_holds(path: str, command: str, flag: str) -> None:
    found = holds(path)
    if found is None or found == command:
        return
    what = "a model checkpoint" if found == "checkpoint" else f"a {found} run"
    raise ValueError(
        f"{flag} {path} holds {what}, not a {command} run; {command} writes only into a "
        f"new directory or its own run: pass another {flag}"
    )


def _lock(path: str, command: str, flag: str) -> tuple[int, bool]:
    """Takes the lock of `path`: (its open fd, whether this made `path` again after a
    failed run removed it)."""
    lock = os.path.join(path, LOCK)
    remade = False
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a failed run removed the directory it had made
            os.makedirs(path, exist_ok=True)
            remade = True
            continue
        except OSError as e:
            raise ValueError(f"{flag} {path} is not writable ({e.strerror or e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise ValueError(
                f"{flag} {path} is in use by another run ({owner}); wait for it to "
                f"finish, or pass another {flag}"
            ) from None
        # The holder before us may have removed the directory's lock file (an unused
        # directory, see claim); a lock on the removed file would lock nothing.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
        os.makedirs(path, exist_ok=True)
        remade = True
    else:
        raise ValueError(f"{flag} {path}: its lock file {lock} keeps being replaced")
    try:
        _check_holds(path, command, flag)  # again, now that no other run can write
        text = json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (text + "\n").encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd, remade


def _owner(fd: int) -> str:
    """The holder of a lock, as its lock file names it."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode())
        return f"{owner['command']}, pid {owner['pid']} on {owner['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its lock file names no process yet"


def _remove_if_unused(path: str, before: set[str] | None, top: str) -> None:
    """After a failed run that wrote no file: removes what it made, so the directory is
    as it was: the directory itself and its new parents up to `top`, or in one that
    existed (`before`: its entries then) the lock file and the empty directories the run
    added."""
    added = [n for n in os.listdir(path) if before is None or n not in before]
    for name in added:
        entry = os.path.join(path, name)
        if name != LOCK and (
            not os.path.isdir(entry) or any(files for _, _, files in os.walk(entry))
        ):
            return  # the run wrote something: keep it (a rerun resumes it)
    if before is None:
        shutil.rmtree(path, ignore_errors=True)
        _remove_parents(path, top)
        return
    for name in added:
        entry = os.path.join(path, name)
        with contextlib.suppress(OSError):
            shutil.rmtree(entry) if os.path.isdir(entry) else os.remove(entry)
