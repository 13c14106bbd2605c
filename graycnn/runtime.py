"""Process-wide JAX settings shared by the experiment scripts and the tests."""

import os
import sys
from collections.abc import Callable

import jax
from absl import app, flags, logging


def enable_compilation_cache(directory: str | None = None) -> None:
    """Caches compiled programs on disk: a DenseNet train step compiles in ~10 s on CPU,
    and a second run of the same shapes then loads it in ~2 s."""
    directory = directory or os.path.join(os.path.expanduser("~"), ".cache", "graycnn", "jax")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def setup(distributed: bool = False) -> None:
    """Call first in every entry point.

    Args:
        distributed: Join a multi-host run with `jax.distributed.initialize()`, which reads
            the coordinator address, process count and id from the cluster environment
            (SLURM, TPU pods, or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
            JAX_PROCESS_ID variables).
    """
    if distributed:
        jax.distributed.initialize()
    enable_compilation_cache()


INPUT_ERRORS = (ValueError, KeyError, OSError)


def error_line(e: BaseException) -> str:
    """The one line a CLI prints for an input error (a multi-line message would read as
    two errors)."""
    return "error: " + " ".join(str(e).split())


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)`, with the input errors graycnn raises, and bad flags, shown as
    one line `error: ...` and exit status 2, instead of a traceback.

    OSError (a full disk, a permission denied mid-run) is shown the same way: it names
    the path, and a traceback would add nothing for the user.
    """

    def wrapped(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # JAX logs its TPU probe at INFO.
        try:
            main(argv)
        except INPUT_ERRORS as e:
            # After a failed orbax restore its background threads still report into a
            # closed event loop ("Event loop is closed" tracebacks); mute them and exit
            # at once, so the one line that matters stands alone. Every file we write
            # is complete or absent (atomic writes), so skipping shutdown loses nothing.
            sys.unraisablehook = lambda _: None
            print(error_line(e), file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2)

    app.run(wrapped, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad or missing flag, or any positional argument, as
    one `error: ...` line and exit status 2 (absl's own is "FATAL Flags parsing error"
    plus a usage hint, exit 1)."""
    try:
        rest = flags.FLAGS(argv)
        if len(rest) > 1:
            # No command takes positional arguments: a stray word, or `--augment false`
            # (a bool flag takes no separate value), would otherwise be ignored.
            raise flags.Error(f"unexpected arguments {rest[1:]}; flags are --name=value")
        return rest
    except flags.Error as e:
        print(error_line(e), file=sys.stderr, flush=True)
        sys.exit(2)
