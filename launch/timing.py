"""Wall-clock timing shared by the benchmark scripts (no JAX or torch import, so either side can use it)."""

import time
from collections.abc import Callable


def timed(fn: Callable[[], object], *, steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed calls (``fn`` must block)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times
