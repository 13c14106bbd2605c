"""graycnn.host_memory: freed blocks come back without page faults."""

import os
import subprocess
import sys
import textwrap

from graycnn import host_memory

# In a fresh process: import graycnn (or not), then in a new thread, as XLA's runtime
# does, allocate, touch and free 96 MiB twice; print the minor page faults of the
# second round. 96 MiB is 24,576 pages of 4 KiB.
_SCRIPT = textwrap.dedent(
    """
    import ctypes, resource, sys, threading
    if sys.argv[1] == "import":
        import graycnn  # noqa: F401
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []

    def rounds():
        for _ in range(2):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = libc.malloc(96 << 20)
            ctypes.memset(block, 1, 96 << 20)
            libc.free(block)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    thread = threading.Thread(target=rounds)
    thread.start()
    thread.join()
    print(faults[1])
    """
)


def _second_round_faults(mode: str, **env: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


def test_freed_memory_is_reused_without_page_faults():
    # glibc's defaults mmap the block and unmap it on free: every page faults again.
    assert _second_round_faults("plain") > 20_000
    assert _second_round_faults("import", GRAYCNN_CPU_SPEEDUPS="0") > 20_000
    # With graycnn's settings the second round reuses the heap's pages.
    assert _second_round_faults("import") < 1_000


def test_settings_respect_the_switch_and_the_environment():
    assert host_memory.keep_freed_memory({"GRAYCNN_CPU_SPEEDUPS": "0"}) == []
    assert host_memory.keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == []
    applied = host_memory.keep_freed_memory({"MALLOC_ARENA_MAX": "4"})
    assert [s.split("=")[0] for s in applied] == [
        "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"
    ]  # fmt: skip
