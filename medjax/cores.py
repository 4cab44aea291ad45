"""How many CPU cores a run uses: ``config.cpu_cores``, applied before JAX starts its CPU client.

XLA CPU sizes its intra-op thread pool, which YNNPACK's matmuls and every parallel loop share, to the
cores the process may run on (its affinity mask), once, when the CPU client starts. So the one lever that
works from Python is the affinity mask, set before then: :func:`limit` pins the process to its first
``n`` schedulable cores. Use it to leave cores to other work on a shared machine, or to reproduce a
study's thread count (study A trained on 8 threads). Runs with different ``cpu_cores`` compute the same
model; float sums may be split across threads differently, so they agree to rounding, not bit for bit.
"""

import os

from medjax.errors import ConfigError


def available() -> list[int]:
    """The CPU cores this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def limit(cores: int | None) -> None:
    """Pins this process (and the threads it starts later) to its first ``cores`` schedulable cores.

    ``None``, or the number it may already use, changes nothing, so calling it again is harmless.

    Raises:
      ConfigError: when ``cores`` is not between 1 and the cores available, or when JAX's CPU client
        already started with more (its thread pool would keep its size), saying where to set it instead.
    """
    if cores is None:
        return
    cpus = available()
    if isinstance(cores, bool) or not isinstance(cores, int) or not 1 <= cores <= len(cpus):
        raise ConfigError(
            f"config.cpu_cores={cores!r}: expected a whole number from 1 to {len(cpus)}, the cores this "
            f"process may run on ({cpus}); None uses them all."
        )
    if cores == len(cpus):
        return
    from jax._src import xla_bridge  # No public API tells whether the backends have started.

    if xla_bridge.backends_are_initialized():
        raise ConfigError(
            f"config.cpu_cores={cores}, but JAX already started its CPU client with {len(cpus)} cores, and "
            "its thread pool keeps that size. Set it before JAX runs anything: `python -m medjax.launch` "
            "does; in a notebook call medjax.cores.limit(n) first, or start Python with `taskset -c 0-<n-1>`."
        )
    os.sched_setaffinity(0, cpus[:cores])
