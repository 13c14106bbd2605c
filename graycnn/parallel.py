"""Data parallelism: a 1-D mesh of every device, batches split over it.

Every device of every host (after `jax.distributed.initialize()`) is one position of the
`data` axis. Parameters are replicated; a batch's rows are split across devices, and
each host places only its own slice of every global batch.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def mesh_shardings() -> tuple[NamedSharding, NamedSharding]:
    """(batch sharding over every device, replicated sharding)."""
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
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


def round_to_devices(batch_size: int) -> int:
    """The largest multiple of the device count <= batch_size (at least one per device)."""
    n = jax.device_count()
    return max(n, batch_size // n * n)
