"""Data parallelism: a 1-D mesh of every device, batches split over it.

Every device of every host (after `jax.distributed.initialize()`) is one position of the
`data` axis. Parameters are replicated; a batch's rows are split across devices, and
each host places only its own slice of every global batch.

Every process runs every stage; only process 0 writes files (`primary`), and a choice
that depends on the files (resume or not) is process 0's, shared (`from_primary`).
"""

import itertools
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

T = TypeVar("T")
# How long the other processes wait for process 0's value: far above any stage between
# two agreements; a dead process 0 ends the run sooner (`runtime._PeerWatch`).
AGREE_TIMEOUT_S = 24 * 3600
_agreements = itertools.count()


def primary() -> bool:
    """Whether this process writes the run's files: process 0 (the only one of a
    single-process run)."""
    return jax.process_index() == 0


def from_primary(compute: Callable[[], T]) -> T:
    """`compute()` of process 0, on every process; the others do not call it.

    For choices read from files (does a checkpoint exist, a saved result), so that every
    process takes the same path however far ahead process 0 is in writing. Every process
    must call this at the same points, in the same order.

    Args:
        compute: Returns a JSON value (tuples come back as lists).

    Returns:
        The value; in a multi-process run, through JSON on every process (process 0
        too, so that all hold equal values).
    """
    if jax.process_count() == 1:
        return compute()
    from jax._src import distributed  # jax 0.10 has no public handle on its client

    client: Any = distributed.global_state.client
    key = f"graycnn/agreed/{next(_agreements)}"
    if primary():
        text = json.dumps(compute())
        client.key_value_set(key, text)
    else:
        text = client.blocking_key_value_get(key, AGREE_TIMEOUT_S * 1000)
    return json.loads(text)


def mesh_shardings(devices: Sequence[jax.Device] | None = None) -> tuple[NamedSharding, ...]:
    """(batch sharding over `devices`, replicated sharding): default every device of
    every process; e.g. `jax.local_devices()` for work each process does on its own."""
    mesh = Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))
    return NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())


def shard_batch(sharding: NamedSharding, *arrays: np.ndarray) -> list[jax.Array]:
    """Places global-batch host arrays (B, ...) on the mesh; each process sends only its
    slice of rows [i * B / n, (i + 1) * B / n)."""
    n, i = jax.process_count(), jax.process_index()
    out = []
    for a in arrays:
        if len(a) % jax.device_count():
            raise ValueError(
                f"batch size {len(a)} must be divisible by the {jax.device_count()} devices"
            )
        local = a[i * len(a) // n : (i + 1) * len(a) // n]
        out.append(jax.make_array_from_process_local_data(sharding, local, a.shape))
    return out


def check_batch_size(batch_size: int, flag: str = "--batch_size") -> int:
    """Returns `batch_size` if the devices can split it evenly, else raises ValueError
    naming `flag` and the device count. For training, where a batch's size is part of
    the result (its gradient and BatchNorm statistics): padding would change both, and
    rounding would train with a batch size no one asked for."""
    n = jax.device_count()
    if batch_size % n:
        raise ValueError(
            f"{flag}={batch_size} is not a multiple of the {n} devices, which split each "
            f"batch evenly: give a multiple of {n}, e.g. {max(n, batch_size // n * n)}"
        )
    return batch_size


def round_to_devices(batch_size: int) -> int:
    """The largest multiple of the device count <= batch_size (at least one per device)."""
    n = jax.device_count()
    return max(n, batch_size // n * n)


def map_in_chunks(
    fn: Callable[[Any, jax.Array], jax.Array], chunk: int
) -> Callable[[Any, jax.Array], jax.Array]:
    """fn(params, x) evaluated on each device's rows of x, `chunk` rows at a time.

    For row-wise independent functions (inference: no batch statistics). On the CPU a
    whole device batch's activations outgrow the cache between layers, while a chunk's
    stay in it (benchmarks/README.md).

    Args:
        fn: params (replicated), x (B, ...) -> y (B, ...), row i of y from row i of x.
        chunk: Rows per call of `fn` on each device; a device's rows are padded to a
            multiple of it and the padding's outputs dropped.

    Returns:
        g(params, x) -> fn(params, x) up to float rounding, x and y split over the mesh's
        `data` axis (x's rows a multiple of the device count).

    Raises:
        ValueError: chunk < 1.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 row, got {chunk}")
    mesh = mesh_shardings()[0].mesh

    def local(params, x):
        n = x.shape[0]
        padded = jnp.pad(x, [(0, -n % chunk)] + [(0, 0)] * (x.ndim - 1))
        y = jax.lax.map(lambda rows: fn(params, rows), padded.reshape(-1, chunk, *x.shape[1:]))
        return y.reshape(-1, *y.shape[2:])[:n]

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec("data")),
        out_specs=PartitionSpec("data"),
    )
