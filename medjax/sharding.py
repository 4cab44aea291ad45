"""One code path for one or many devices and processes: a ``('data', 'model')`` mesh.

Batches are split along their first axis over every device of the mesh; parameters and optimizer state
are replicated (``'model'`` has size 1), or, for models too large for one device, each split over
``config.mesh.param_shards`` devices along the second axis (FSDP style: XLA gathers a layer's
parameters where the step needs them and reduce-scatters their gradients).
On one CPU this is a mesh of one device and costs nothing; with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, several GPUs, or several processes joined by
``jax.distributed`` (:mod:`medjax.distributed`) the same code runs data-parallel.

With several processes each one reads only its rows of every global batch (:mod:`medjax.data.pipeline`
slices them by :func:`process_shard`), :func:`shard_batch` assembles the rows of all processes into one
global array without copying data between them, and :func:`gather` brings a sharded result (evaluation
logits) back as one numpy array on every process. The global batch size (``config.data.batch_size``)
means the same for any device or process count, and so does every step's result, up to the order of
float additions across devices.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medjax.errors import ConfigError

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(param_shards: int = 1) -> Mesh:
    """A mesh over every device of every process, of shape ``(devices / param_shards, param_shards)``
    with axes ``('data', 'model')``.

    Devices are ordered by process, so process ``i``'s rows of a global batch are one contiguous block
    (rows ``i * B / P`` to ``(i + 1) * B / P``), the block :func:`process_shard` has it read.

    Raises:
      ConfigError: when ``param_shards`` does not divide the device count.
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if param_shards < 1 or len(devices) % param_shards:
        raise ConfigError(
            f"mesh.param_shards={param_shards} must divide the number of devices ({len(devices)}); "
            "1 replicates the parameters."
        )
    return Mesh(np.asarray(devices).reshape(-1, param_shards), (DATA_AXIS, MODEL_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over every device (both axes): parameter shards do not cost data parallelism."""
    return NamedSharding(mesh, PartitionSpec((DATA_AXIS, MODEL_AXIS)))


def param_spec(shape: tuple[int, ...], shards: int) -> PartitionSpec:
    """How one parameter (or optimizer moment) of ``shape`` is split over ``shards`` devices: along its
    largest dimension that divides evenly (the last of equals, usually output channels); replicated when
    ``shards`` is 1 or no dimension divides (biases of odd width, scalars)."""
    if shards == 1:
        return PartitionSpec()
    sizes = [(size, axis) for axis, size in enumerate(shape) if size % shards == 0]
    if not sizes:
        return PartitionSpec()
    axis = max(sizes)[1]
    return PartitionSpec(*([None] * axis), MODEL_AXIS)


def place_state(tree, mesh: Mesh):
    """Puts a train state (parameters, optimizer state, statistics) on the mesh: replicated, or split
    over the ``'model'`` axis per :func:`param_spec`."""
    shards = mesh.shape[MODEL_AXIS]
    return jax.device_put(
        tree, jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), shards)), tree)
    )


def process_shard() -> dict[str, int]:
    """``{'shard_index': process index, 'shard_count': process count}``: the keyword arguments that make
    the input pipeline read this process's rows of each global batch."""
    return {"shard_index": jax.process_index(), "shard_count": jax.process_count()}


def check_batch_size(batch_size: int, mesh: Mesh, *, what: str = "data.batch_size") -> None:
    """Raises ValueError unless ``batch_size`` splits evenly over the mesh and the processes."""
    if batch_size % mesh.size or batch_size % jax.process_count():
        raise ValueError(
            f"{what}={batch_size} must be divisible by the number of devices ({mesh.size}) "
            f"and processes ({jax.process_count()})."
        )


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Places this process's rows of a global batch on the mesh (each process passes its own rows, in
    process order; with one process, the whole batch)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
    """Puts every leaf of ``tree`` on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def gather(tree):
    """Every leaf's global value as a numpy array, on every process.

    For the outputs of a step over a sharded batch (per-example logits, labels, masks): with several
    processes no process holds all rows, so they are all-gathered (a collective: every process must call
    this with the same structure). Replicated values (scalars) come back as they are.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def is_primary() -> bool:
    """Whether this process writes the run's files (metrics, report): process 0, the only writer."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process got here (a no-op with one process), e.g. until process 0 prepared the
    dataset or wrote a file the others read."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
