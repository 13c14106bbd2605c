"""Thin absl-flags entry points: `python -m experiments.<name> --helpfull`.

XLA runs each CPU convolution on one core, so on a CPU-only machine the scripts split the
host into 2 devices (data parallel, ~1.5x faster training on 2 cores). This must happen
before JAX starts; it does not affect GPUs or TPUs. Set XLA_FLAGS yourself to override.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    _n = min(2, os.cpu_count() or 1)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}"
    ).strip()
