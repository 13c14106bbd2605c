"""graycnn's CPU tuning, opt-in: `enable_cpu_defaults()` sets XLA flags for the process
and turns on the CPU speed-ups of train and eval steps. Importing graycnn changes
nothing; the experiment CLIs and benchmarks opt in (experiments/__init__.py,
benchmarks/__init__.py), and a library user who wants the same speed calls

    from graycnn import xla_options
    xla_options.enable_cpu_defaults()  # before anything starts JAX's backend

None of it changes what runs on a GPU or TPU, or any result beyond float rounding.
Measurements behind each choice: benchmarks/README.md.
"""

import os
import warnings
from collections.abc import Mapping, MutableMapping

import jax

XLA_DEFAULTS: Mapping[str, str] = {
    # Two CPU devices, data parallel: every op of a step runs on both cores, not only
    # the convolutions and the ops XLA splits itself.
    "xla_force_host_platform_device_count": str(min(2, os.cpu_count() or 1)),
    # The two host devices meet in an all-reduce at every step. XLA aborts the process
    # when one waits more than 40 s there, which a busy machine (other jobs on the same
    # cores) causes without anything being wrong, so allow an hour.
    "xla_cpu_collective_call_terminate_timeout_seconds": "3600",
}

# jaxlib 0.10 hands CPU convolutions to YNNPACK. Its weight-gradient convolutions (a
# window as large as the image) are slower than XLA's Eigen ones (a whole train step is
# 1.07-1.14x faster with Eigen), so a train step that takes kernel gradients keeps
# YNNPACK for dots only. Inference and input gradients (eval, receptive fields) keep
# XLA's default.
_CPU_TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
# A train step with every conv frozen (BN-only training) takes no kernel gradient: there
# YNNPACK's convolutions and dots, each in a fusion of its own, are 1.03x faster than
# XLA's default YNNPACK fusions and 1.11x faster than Eigen's convolutions
# (benchmarks/README.md, "The BN-only step on YNNPACK").
_CPU_FROZEN_CONV_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    )
}


# Process state, set only by `enable_cpu_defaults` and `set_cpu_speedups`.
_speedups_enabled = False


def enable_cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Opts this process into graycnn's CPU tuning; call it before JAX starts a backend.

    (a) Adds each of `XLA_DEFAULTS` that XLA_FLAGS does not name to XLA_FLAGS (2 host
    devices, a collective timeout): XLA reads XLA_FLAGS once, when JAX starts its first
    backend, so after that it warns and adds nothing. Flags the user set win.
    (b) Turns on the CPU speed-ups (`cpu_speedups`), which need no restart.

    Returns:
        The flags added, e.g. ['--xla_force_host_platform_device_count=2'].
    """
    set_cpu_speedups(True)
    return apply_xla_defaults(environ)


def set_cpu_speedups(enabled: bool) -> bool:
    """Turns the CPU speed-ups on or off for models and steps built from now on (what
    benchmarks do to measure them); returns the previous setting."""
    global _speedups_enabled
    previous, _speedups_enabled = _speedups_enabled, bool(enabled)
    return previous


def cpu_speedups() -> bool:
    """Whether the CPU speed-ups apply: the convolution library of each train step
    (`train_compiler_options`), one-pass BatchNorm and the dot convolutions
    (`graycnn.models.build_model`), eval steps in chunks (`graycnn.training.evaluation`).

    True when the process opted in (`enable_cpu_defaults` or `set_cpu_speedups(True)`)
    and the default backend is a CPU.
    """
    return _speedups_enabled and jax.default_backend() == "cpu"


def train_compiler_options(kernel_gradients: bool = True) -> dict[str, str] | None:
    """`compiler_options` for `jax.jit` of a train step on CPU: Eigen convolutions where
    the step takes conv kernel gradients, YNNPACK's where it trains no conv (BN-only
    training); None (XLA's defaults) on GPU and TPU or with the speed-ups off."""
    if not cpu_speedups():
        return None
    return dict(_CPU_TRAIN_OPTIONS if kernel_gradients else _CPU_FROZEN_CONV_OPTIONS)


def apply_xla_defaults(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Appends each of `XLA_DEFAULTS` that XLA_FLAGS does not name to XLA_FLAGS (part (a)
    of `enable_cpu_defaults`).

    Returns:
        The flags added, e.g. ['--xla_force_host_platform_device_count=2'].
    """
    current = environ.get("XLA_FLAGS", "")
    added = [f"--{k}={v}" for k, v in XLA_DEFAULTS.items() if f"--{k}=" not in current]
    if not added:
        return []
    if _backends_started():
        warnings.warn(
            "JAX started before graycnn.xla_options.enable_cpu_defaults() ran, so its XLA "
            f"flags {added} do not apply (one CPU device instead of two); call it first",
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
