"""Timing, statistics and run records shared by the benchmark scripts.

No JAX or torch import, so either framework's worker, and the parent that only spawns workers, can use it.
Two rules make comparisons on a shared machine trustworthy, and both live here: cases run interleaved
in rounds, each round in a rotated order (:func:`rotated`), so that a slow minute hits every case alike
instead of the ones that happened to run then; and a result is a median with its min/max over rounds
(:func:`spread`), with the load average beside it, never one number.
"""

import contextlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "torch")


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


def rotated(items: Sequence, round_index: int) -> list:
    """``items`` started at position ``round_index`` (mod its length): over as many rounds as items,
    every item runs once in every position, first and last included."""
    if not items:
        return []
    k = round_index % len(items)
    return [*items[k:], *items[:k]]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of ``values`` (one per round)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio(numerator: dict[str, float], denominator: dict[str, float]) -> dict[str, float]:
    """``numerator / denominator`` of two :func:`spread` results: the ratio of medians, and the range the
    extremes allow (lowest numerator over highest denominator, and the reverse)."""
    return {
        "median": numerator["median"] / denominator["median"],
        "min": numerator["min"] / denominator["max"],
        "max": numerator["max"] / denominator["min"],
    }


def fmt(s: dict[str, float], digits: int = 2) -> str:
    """``median [min-max]`` of a :func:`spread` or :func:`ratio`."""
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def peak_rss_mb() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def minor_faults() -> int:
    """Page faults served without I/O so far: each is a page the kernel zero-filled, the cost a caching
    allocator avoids. Unlike time, the count does not depend on what else the machine runs."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def load_average() -> float:
    """One-minute load average: how busy the machine was, to read next to any timing."""
    return round(os.getloadavg()[0], 2)


def commit(repo: Path = REPO) -> str:
    """``HEAD`` of ``repo``, with ``+dirty`` when tracked files differ from it; 'unknown' outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD")
    if not head:
        return "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def versions() -> dict[str, str]:
    """Installed versions of the frameworks being compared (absent ones omitted), and Python's."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def cpu() -> str:
    """The CPU's model name and vendor from ``/proc/cpuinfo`` ('' where there is none): which matmul medjax
    trains with depends on the vendor (``native.matmul_preferred``), so results name the machine's CPU."""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
        return f"{fields.get('model name', '?')} ({fields.get('vendor_id', '?')})"
    return ""


def run_record(**extra) -> dict:
    """What any benchmark JSON starts with: when, where, which code and which versions."""
    return {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "commit": commit(),
        "host": platform.node(),
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu(),
        "versions": versions(),
        **extra,
    }
