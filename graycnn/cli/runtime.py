"""Process-wide JAX settings shared by the experiment scripts and the tests, and how a
process joins a multi-host run.

Every experiment script that computes calls `define_distributed_flags()` at import and
`setup()` first in main. Then the same command, started on each host with
`--distributed`, joins one run:

    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \
        python -m experiments.train --distributed --workdir=/shared/run   # host0
    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 \
        python -m experiments.train --distributed --workdir=/shared/run   # host1

(or `--coordinator_address`, `--num_processes`, `--process_id`). On SLURM and TPU pods
`--distributed` alone is enough: JAX finds its peers from the cluster environment.
"""

import atexit
import dataclasses
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

import jax
from absl import app, flags, logging
from tqdm.auto import tqdm

from graycnn import config
from graycnn.cli import workdir
from graycnn.training import checkpoint

_ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
# Input errors: shown as one `error:` line, exit status 2.
INPUT_ERRORS = (ValueError, KeyError, OSError)
# The line of a Ctrl-C (exit status 130); commands whose rerun resumes add RESUME.
INTERRUPTED = "interrupted"
RESUME = "; run the same command again to resume"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-host run; every field is also a flag of the
    experiment scripts. A field left None comes from its environment variable, else from
    JAX's cluster detection (SLURM, TPU pods, Open MPI)."""

    distributed: bool = config.setting(
        False,
        "Join a multi-host run (jax.distributed.initialize()); start the same command on "
        "every host. Implied by --coordinator_address, --num_processes or --process_id.",
    )
    coordinator_address: str | None = config.setting(
        None, "host:port of process 0, the same on every host (default $JAX_COORDINATOR_ADDRESS)."
    )
    num_processes: int | None = config.setting(
        None, "Processes in the run (default $JAX_NUM_PROCESSES)."
    )
    process_id: int | None = config.setting(
        None, "This process's index, 0 to num_processes - 1 (default $JAX_PROCESS_ID)."
    )
    join_timeout: int = config.setting(
        300,
        "Multi-host: seconds to wait for every process to join the run (then JAX aborts "
        "the process with its own message).",
    )
    peer_timeout: int = config.setting(
        30,
        "Multi-host: seconds a process may go silent before process 0 stops the run with an "
        "error (a process that dies in a collective is noticed at once).",
    )

    @property
    def enabled(self) -> bool:
        return self.distributed or any(getattr(self, name) is not None for name in _ENV)


def define_distributed_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines --distributed, --coordinator_address, --num_processes, --process_id,
    --join_timeout and --peer_timeout; `setup()` then reads them."""
    config.define_flags(DistributedConfig, flag_values=flag_values)


def enable_compilation_cache(directory: str | None = None) -> None:
    """Caches compiled programs on disk, so a second run of the same shapes loads them
    instead of compiling them again."""
    directory = directory or os.path.join(os.path.expanduser("~"), ".cache", "graycnn", "jax")
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program, however quick to compile: a run compiles hundreds of small ones
    # (BUILD_NOTES.md, "runtime and the CLIs").
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def setup(distributed: DistributedConfig | None = None) -> None:
    """Call first in every entry point.

    Args:
        distributed: How to join a multi-host run; default: from the flags of
            `define_distributed_flags` if they were defined, else a single process.
    """
    if distributed is None and "distributed" in flags.FLAGS:
        distributed = config.from_flags(DistributedConfig)
    if distributed is not None and distributed.enabled:
        initialize(distributed)
    enable_compilation_cache()


def initialize(options: DistributedConfig) -> None:
    """`jax.distributed.initialize` with the flags, else JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID (JAX itself reads only the first), else JAX's
    cluster detection; then watches the other processes (see `_PeerWatch`).

    Raises:
        ValueError: a malformed variable, or too little to find the other processes.
    """
    kwargs = {}
    for name, variable in _ENV.items():
        value = getattr(options, name)
        if value is None and os.environ.get(variable):
            value = os.environ[variable]
            if name != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"${variable} must be an integer, got {value!r}") from None
        if value is not None:
            kwargs[name] = value
    for name in ("join_timeout", "peer_timeout"):
        if getattr(options, name) < 1:
            raise ValueError(f"--{name} must be >= 1 s, got {getattr(options, name)}")
    try:
        jax.distributed.initialize(
            **kwargs,
            initialization_timeout=options.join_timeout,
            # JAX's own failure detection aborts the process with a C++ stack trace;
            # ours (`_PeerWatch`) must come first, so JAX's is twice as patient.
            heartbeat_timeout_seconds=2 * options.peer_timeout,
            shutdown_timeout_seconds=2 * options.peer_timeout,
        )
    except ValueError as e:
        raise ValueError(
            f"cannot join the multi-host run: {e} Give --coordinator_address, "
            "--num_processes and --process_id, or set JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID (SLURM and TPU pods need none)."
        ) from None
    global _watch
    if jax.process_count() > 1 and _watch is None:
        checkpoint.use_coordination_barriers()
        _watch = _PeerWatch(options.peer_timeout)


class _PeerWatch:
    """Stops the run with one `error:` line when a process goes silent.

    JAX's coordination service also notices a dead process (after its heartbeat
    timeout), but then aborts every process with a C++ stack trace, and its callback
    cannot be replaced from Python in jax 0.10 (a Python callback fails with
    std::bad_cast). So every process beats a counter in the coordinator's key-value
    store each second; process 0 watches them all, and when one stops changing for
    `timeout` seconds it posts the reason for the others, waits for them to read it,
    and exits. The others watch only for that post; if process 0 itself dies, JAX
    aborts them at once. A process whose main returned posts 'done' and is not waited
    for.
    """

    PREFIX = "graycnn/alive/"
    FAILED = "graycnn/failed"
    INTERVAL = 1.0

    def __init__(self, timeout: float):
        # jax 0.10 has no public handle on its coordination client.
        from jax._src import distributed

        self.client: Any = distributed.global_state.client  # set by jax.distributed
        self.timeout = timeout
        self.me, self.count = jax.process_index(), jax.process_count()
        self.stopped = threading.Event()
        self.others_alive = True
        self.thread = threading.Thread(target=self._loop, name="graycnn-peers", daemon=True)
        self.thread.start()
        atexit.register(self.finish)  # runs before JAX's own shutdown (atexit is LIFO)

    def finish(self) -> None:
        """This process is done: stop beating and tell process 0 not to wait for it."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.thread.join(timeout=5 * self.INTERVAL)
        try:
            self.client.key_value_set(f"{self.PREFIX}{self.me}", "done", allow_overwrite=True)
        except Exception:  # process 0 may be gone already; nothing to tell.
            pass

    def post_failure(self, message: str) -> None:
        """From process 0: tells the others why the run stops, and gives them time to read
        it before the coordinator (this process) goes."""
        if self.me != 0 or not self.others_alive:
            return
        try:
            self.client.key_value_set(self.FAILED, message, allow_overwrite=True)
            time.sleep(3 * self.INTERVAL)
        except Exception:  # best effort: we are failing anyway.
            pass

    def _loop(self) -> None:
        seen: dict[int, tuple[str | None, float]] = {}  # process -> (beat, when it changed)
        try:
            while not self.stopped.is_set():
                self.client.key_value_increment(f"{self.PREFIX}{self.me}", 1)
                if self.me == 0:
                    beats = dict(self.client.key_value_dir_get(self.PREFIX))
                    now = time.monotonic()
                    for j in range(1, self.count):
                        beat = beats.get(f"{self.PREFIX}{j}")
                        if beat == "done":
                            continue
                        if j not in seen or seen[j][0] != beat:
                            seen[j] = (beat, now)
                        elif now - seen[j][1] > self.timeout:
                            self.others_alive = self.count > 2  # else nobody to tell
                            fail(
                                f"process {j} sent no sign of life for {self.timeout} s "
                                "(it died or hangs); stopping the run",
                                status=1,
                            )
                else:
                    failed = self._try_get(self.FAILED)
                    if failed is not None:
                        fail(f"process 0 stopped the run: {failed}", status=1)
                self.stopped.wait(self.INTERVAL)
        except Exception as e:  # any failure to reach the coordinator.
            if not self.stopped.is_set():
                fail(f"lost the coordinator (process 0): {_first_line(e)}", status=1)

    def _try_get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception as e:
            if "NOT_FOUND" in str(e):
                return None
            raise


_watch: _PeerWatch | None = None
_failing = threading.Lock()


def fail(message: str, status: int = 2) -> NoReturn:
    """Leaves the process at once with one line `error: <message>` on stderr (in a
    multi-host run `error: process I of N: <message>`, and process 0 first posts the
    message for the others, see `_PeerWatch`).

    Skips interpreter shutdown: in a multi-host run, JAX's shutdown would wait for the
    other processes, and after a failed orbax restore its background threads report
    into a closed event loop ("Event loop is closed" tracebacks). Every file we write is
    complete or absent (atomic writes), so skipping shutdown loses nothing.
    """
    if not _failing.acquire(blocking=False):  # another thread is already failing
        while True:
            time.sleep(60)
    sys.unraisablehook = lambda _: None
    where = f"process {jax.process_index()} of {jax.process_count()}: " if _watch else ""
    sys.stdout.flush()
    # tqdm.write clears any progress bar first, so the message starts its own line.
    tqdm.write(f"error: {where}{message}", file=sys.stderr)
    sys.stderr.flush()
    if _watch is not None:
        _watch.post_failure(message)
    os._exit(status)


def error_line(e: BaseException) -> str:
    """The one line a CLI prints for an input error (a multi-line message would read as
    two errors)."""
    return "error: " + _one_line(e)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def run(main: Callable[[list[str]], None], resumes: bool = False) -> None:
    """`absl.app.run(main)`, with the input errors graycnn raises, and bad flags, shown as
    one line `error: ...` and exit status 2, instead of a traceback.

    Ctrl-C (SIGINT) is one line `error: interrupted` too, exit status 130, once the
    workdir's lock is released (`workdir.claim`); with `resumes` (a command whose rerun
    resumes its workdir) the line says so.

    OSError (a full disk, a permission denied mid-run) is shown the same way: it names
    the path, and a traceback would add nothing for the user.

    In a multi-host run every failure leaves at once (exit status 1), so the other
    processes notice instead of waiting on this one: a failed collective (another
    process died) as one `error:` line, any other exception after its traceback.
    """

    def wrapped(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # JAX logs its TPU probe at INFO.
        message = INTERRUPTED + (RESUME if resumes else "")
        signal.signal(signal.SIGINT, _Interrupt(message))
        try:
            main(argv)
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, *INPUT_ERRORS)):
                workdir.remove_unused()  # stopped before writing anything: no debris
            if isinstance(e, KeyboardInterrupt):
                fail(message, status=130)
            if _watch is not None and _is_collective_failure(e):
                fail(
                    "a collective with the other processes failed, most likely because "
                    f"one of them died: {_first_line(e)}",
                    status=1,
                )
            if isinstance(e, INPUT_ERRORS):
                fail(_one_line(e))
            if _watch is None or (isinstance(e, SystemExit) and not e.code):
                raise
            traceback.print_exc()
            fail(f"{type(e).__name__}: {_first_line(e)}", status=1)
        if _watch is not None:
            _watch.finish()

    app.run(wrapped, flags_parser=parse_flags)


class _Interrupt:
    """The SIGINT handler of a command: the first Ctrl-C raises KeyboardInterrupt, which
    unwinds main (releasing its workdir, see `workdir.claim`) to the one line of `run`;
    a second one leaves at once with the same line, in case a library swallowed the
    first.

    Not `signal.default_int_handler`: `asyncio.run` (orbax saves through it) replaces
    that one with its own, which only cancels its task.
    """

    def __init__(self, message: str):
        self.message = message
        self.count = 0

    def __call__(self, signum, frame) -> None:
        self.count += 1
        # The unwinding interrupts coroutines and event loops, whose complaints
        # ("coroutine ... was never awaited", "Event loop is closed") would bury the line.
        sys.unraisablehook = lambda _: None
        threading.excepthook = lambda _: None
        warnings.simplefilter("ignore")
        if self.count > 1:
            fail(self.message, status=130)
        raise KeyboardInterrupt


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


def _is_collective_failure(e: BaseException) -> bool:
    # jax 0.10 on CPU raises a ValueError "UNKNOWN: Gloo all-reduce failed: ... Connection
    # reset by peer" when the other end of a collective dies.
    text = str(e)
    return any(word in text for word in ("Gloo", "NCCL", "coordination service", "UNAVAILABLE"))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
