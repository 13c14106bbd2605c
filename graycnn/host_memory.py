"""Host memory: glibc malloc settings that keep freed memory for reuse, set when
`graycnn` is imported (a CPU speed-up; the arrays computed are the same).

XLA's CPU runtime allocates a step's buffers afresh at every call (a densenet_seed
train step at batch 128 touches 2.7 GB), from its own threads. glibc serves blocks
above 32 MiB, and any block a thread's non-main arena cannot hold, with a fresh `mmap`
and unmaps them when freed, so every step page-faults all of it in again: 657,000 minor
faults per densenet_seed train step, and a third of the process's CPU time in the
kernel. One arena, no mmap and no trimming keep freed blocks in the heap for the next
step (0 faults per step; measurements: benchmarks/README.md). The price is that the
process keeps its peak heap instead of returning freed memory to the system.

`mallopt` only changes arenas created after it: threads that already allocated keep
theirs, so this runs at import, before JAX starts its backend and its threads.
"""

import ctypes
import os
import sys
from collections.abc import Mapping

# mallopt parameters (glibc's malloc.h) and their values; each one's environment
# variable, which glibc reads at start-up, wins if the user set it.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = (
    # One arena: a non-main arena's heap holds at most 64 MiB, and larger blocks of
    # the threads that use it are mmapped whatever M_MMAP_MAX says.
    ("MALLOC_ARENA_MAX", _M_ARENA_MAX, 1),
    ("MALLOC_MMAP_MAX_", _M_MMAP_MAX, 0),  # every block from the heap, reused when freed
    ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, -1),  # -1: never shrink the heap (mallopt(3))
    ("MALLOC_TOP_PAD_", _M_TOP_PAD, 64 << 20),  # grow it 64 MiB at a time
)


# What this process's import of graycnn set (`keep_freed_memory`'s result).
applied: tuple[str, ...] = ()


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Sets `SETTINGS` with glibc's `mallopt`, except those the environment sets.

    Off with GRAYCNN_CPU_SPEEDUPS=0, and a no-op off Linux or without glibc's mallopt.

    Returns:
        The settings applied, e.g. ['MALLOC_ARENA_MAX=1', ...]; [] if none.
    """
    if environ.get("GRAYCNN_CPU_SPEEDUPS") == "0" or not sys.platform.startswith("linux"):
        return []
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return []  # the user tuned malloc already
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return []
    done = [
        f"{name}={value}"
        for name, param, value in SETTINGS
        if name not in environ and mallopt(param, value) == 1  # 1: accepted
    ]
    global applied
    applied = (*applied, *done)
    return done
