"""Process-wide JAX settings shared by the experiment scripts and the tests.

`apply_xla_defaults` runs when `graycnn` is imported: it adds graycnn's CPU flags to
XLA_FLAGS, which XLA reads once, when JAX starts its first backend. `train_compiler_options`
are the per-program options of the train step.
"""

import os
import sys
import warnings
from collections.abc import Callable, Mapping, MutableMapping

import jax
from absl import app, logging

# XLA flags graycnn sets unless XLA_FLAGS already names them. They only change the CPU
# backend, so GPU and TPU programs are unaffected (BUILD_NOTES.md, Performance).
XLA_DEFAULTS: Mapping[str, str] = {
    # Two CPU devices, data parallel: every op of a step runs on both cores, not only
    # the convolutions and the ops XLA splits itself (~5-10% more img/s on 2 cores).
    "xla_force_host_platform_device_count": str(min(2, os.cpu_count() or 1)),
}

# jaxlib 0.10 hands CPU convolutions to YNNPACK. Its weight-gradient convolutions (a
# window as large as the image) cost ~4x the CPU time of XLA's Eigen ones, so the train
# step keeps YNNPACK for dots only; inference and input gradients (eval, receptive
# fields) are as fast or faster with YNNPACK and keep the default.
_CPU_TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def train_compiler_options() -> dict[str, str] | None:
    """`compiler_options` for `jax.jit` of a train step: Eigen convolutions on CPU, else
    None (XLA's defaults on GPU and TPU)."""
    return dict(_CPU_TRAIN_OPTIONS) if jax.default_backend() == "cpu" else None


def apply_xla_defaults(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Appends each of `XLA_DEFAULTS` that XLA_FLAGS does not name to XLA_FLAGS.

    Returns:
        The flags added, e.g. ['--xla_cpu_experimental_ynn_fusion_type=...'].
    """
    current = environ.get("XLA_FLAGS", "")
    added = [f"--{k}={v}" for k, v in XLA_DEFAULTS.items() if f"--{k}=" not in current]
    if not added:
        return []
    if _backends_started():
        warnings.warn(
            "JAX started before graycnn was imported, so graycnn's XLA defaults "
            f"{added} do not apply (one CPU device instead of two); import graycnn first",
            stacklevel=3,
        )
        return []
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this helper: assume not.
        return False


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


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)`, with the input errors graycnn raises shown as one line
    `error: ...` and exit status 2, instead of a traceback."""

    def wrapped(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # JAX logs its TPU probe at INFO.
        try:
            main(argv)
        except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
            # After a failed orbax restore its background threads still report into a
            # closed event loop ("Event loop is closed" tracebacks); mute them and exit
            # at once, so the one line that matters stands alone. Every file we write
            # is complete or absent (atomic writes), so skipping shutdown loses nothing.
            sys.unraisablehook = lambda _: None
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2)

    app.run(wrapped)
