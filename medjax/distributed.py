"""Several processes, one run: JAX's multi-controller runtime (``jax.distributed``), set up by entry points.

Every process runs the same program on its own devices; ``jax.distributed.initialize`` connects them
through a coordinator (process 0's ``host:port``) so that ``jax.devices()`` lists every device of every
process and one jitted step runs over all of them (:mod:`medjax.sharding`). Going from a laptop to a
cluster is a change of flags:

- one process (the default): nothing to do, nothing is initialised;
- explicit: ``--coordinator_address=10.0.0.1:1234 --num_processes=4 --process_id=$RANK`` on every
  process (a Kubernetes indexed job passes ``$JOB_COMPLETION_INDEX``; ``JAX_COORDINATOR_ADDRESS`` in the
  environment stands for the first flag);
- detected: under ``srun`` (SLURM), Open MPI's ``mpirun`` or on a Cloud TPU VM slice the three values
  come from the environment, exactly as ``jax.distributed.initialize()`` finds them, because that is
  what is called.

On CPU the processes exchange gradients through XLA's CPU collectives, which need a transport: gloo
(TCP, built into jaxlib) by default, so several processes on one machine can train together (that is how
the tests run two). A process that dies stops sending heartbeats; the coordination service then stops
every other process within ``heartbeat_timeout_seconds`` ("Terminating process because the JAX
distributed service detected fatal errors ... another task died"), rather than letting them wait in a
collective forever. Rerunning the same command resumes from the latest checkpoint.

Library functions (``train_and_evaluate``) never initialise anything: a notebook or test that wants
several processes calls :func:`initialize` itself, before JAX starts its backends.
"""

import os

from absl import flags

from medjax.errors import ConfigError

CPU_COLLECTIVES = ("gloo", "mpi")


def define_flags() -> dict[str, flags.FlagHolder]:
    """The multi-process flags of the training commands (``medjax.launch``)."""
    return {
        "coordinator_address": flags.DEFINE_string(
            "coordinator_address",
            None,
            "host:port of process 0, which serves the JAX coordination service (several processes). Also "
            "JAX_COORDINATOR_ADDRESS. Unset under SLURM/Open MPI/Cloud TPU: detected as JAX does.",
        ),
        "num_processes": flags.DEFINE_integer(
            "num_processes", None, "How many processes take part (default: 1, or detected)."
        ),
        "process_id": flags.DEFINE_integer(
            "process_id", None, "This process's rank, 0 to num_processes - 1 (default: 0, or detected)."
        ),
        "heartbeat_timeout_seconds": flags.DEFINE_integer(
            "heartbeat_timeout_seconds",
            100,
            "A process silent this long counts as dead and stops the others (JAX's default: 100).",
        ),
        "cpu_collectives": flags.DEFINE_enum(
            "cpu_collectives",
            "gloo",
            CPU_COLLECTIVES,
            "Transport of cross-process collectives on CPU devices: 'gloo' (TCP, built in) or 'mpi'.",
        ),
    }


def cluster_detected() -> str | None:
    """The name of the cluster environment JAX would read its process layout from, or None.

    Asks JAX's own detectors (SLURM, Open MPI, Cloud TPU VM slices, GKE TPU; Kubernetes only with the
    ``kubernetes`` package), so medjax initialises exactly when ``jax.distributed.initialize()`` would
    find its arguments. ``mpi4py`` is opt-in in JAX and so here.
    """
    from jax._src import clusters  # No public API lists the environments JAX detects.

    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.__name__
    return None


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_seconds: int = 100,
    cpu_collectives: str = "gloo",
) -> bool:
    """Joins this process to a multi-process run when the arguments, the environment or a detected
    cluster say there is one; returns whether it did.

    Must run before JAX starts its backends (before anything touches ``jax.devices()`` or an array).

    Raises:
      ConfigError: for a partial or inconsistent layout (e.g. a process id without a process count),
        naming the flags to give.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    explicit = (coordinator_address, num_processes, process_id)
    cluster = cluster_detected() if None in explicit else None  # Given flags need no detection.
    if all(v is None for v in explicit) and cluster is None:
        return False
    if cluster is None and None in explicit:
        raise ConfigError(
            "A multi-process run needs --coordinator_address (host:port of process 0), --num_processes "
            f"and --process_id on every process outside SLURM/Open MPI/Cloud TPU; got "
            f"coordinator_address={coordinator_address}, num_processes={num_processes}, "
            f"process_id={process_id}."
        )
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
    if cpu_collectives not in CPU_COLLECTIVES:
        raise ConfigError(f"cpu_collectives={cpu_collectives!r}: expected one of {CPU_COLLECTIVES}.")

    import jax
    from jax._src import xla_bridge  # No public API tells whether the backends have started.

    if xla_bridge.backends_are_initialized():
        raise ConfigError(
            "jax.distributed must be initialised before JAX starts its backends; call "
            "medjax.distributed.initialize first thing (python -m medjax.launch does)."
        )
    # Only the CPU client reads this; GPUs and TPUs bring their own collectives (NCCL, ICI).
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )
    return True


def initialize_from_flags(holders: dict[str, flags.FlagHolder]) -> bool:
    """:func:`initialize` with the values of the flags :func:`define_flags` returned."""
    return initialize(**{name: holder.value for name, holder in holders.items()})


def describe() -> str:
    """``'process 1 of 2, 4 of 8 devices (cpu)'``: where this process sits, for the first log line."""
    import jax

    return (
        f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} of "
        f"{jax.device_count()} devices ({jax.default_backend()})"
    )
