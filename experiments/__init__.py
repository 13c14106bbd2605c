"""Thin absl-flags entry points: `python -m experiments.<name> --helpfull`.

XLA runs each CPU convolution on one core, so on a CPU-only machine the scripts split the
host into 2 devices (data parallel, ~1.5x faster training on 2 cores). This must happen
before JAX starts; it does not affect GPUs or TPUs. Set XLA_FLAGS yourself to override.

The two host devices meet in an all-reduce at every step. XLA aborts the process when
one of them waits more than 40 s there, which a busy machine (other jobs on the same 2
cores) can cause without anything being wrong, so the scripts allow an hour.
"""

import os

_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _FLAGS:
    _FLAGS += f" --xla_force_host_platform_device_count={min(2, os.cpu_count() or 1)}"
if "xla_cpu_collective_call_terminate_timeout_seconds" not in _FLAGS:
    _FLAGS += " --xla_cpu_collective_call_terminate_timeout_seconds=3600"
os.environ["XLA_FLAGS"] = _FLAGS.strip()
