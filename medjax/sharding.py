"""One code path for one or many devices: a 1-D ``('data',)`` mesh.

Batches are split along their first axis over the mesh; parameters and optimizer state are replicated.
On one CPU this is a mesh of one device and costs nothing; with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` or several hosts (after
``jax.distributed.initialize()``) the same code runs data-parallel.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A mesh over every device of every process, with the single axis ``'data'``."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, *, what: str = "data.batch_size") -> None:
    """Raises ValueError unless ``batch_size`` splits evenly over the mesh and the processes."""
    if batch_size % mesh.size or batch_size % jax.process_count():
        raise ValueError(
            f"{what}={batch_size} must be divisible by the number of devices ({mesh.size}) "
            f"and processes ({jax.process_count()})."
        )


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Places this process's part of a global batch on the mesh (each process passes its own rows)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
    """Puts every leaf of ``tree`` on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
