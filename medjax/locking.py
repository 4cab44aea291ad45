"""Exclusive locks on a workdir (for a run's life) and on a dataset's preparation.

Two launches on one workdir interleave ``metrics.jsonl`` and read each other's half-written checkpoints;
two preparations of one dataset race to rename the same directory. A lock is an advisory ``flock`` on a
small file, chosen over a create-exclusive lock file because the kernel releases it when its holder
exits in any way, ``kill -9`` and power loss included: a lock can never be stale, so nothing has to guess
from a pid whether a holder still lives (pids are reused, and another host's pids cannot be checked at
all). The holder writes its pid, host, start time and command into the file, and that is what a refused
process prints, so the user knows which process to wait for or stop.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from medjax.errors import BusyError


def holder_info() -> dict:
    """What this process writes into a lock it holds."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:300],
    }


def describe_holder(path: Path) -> str:
    """``pid 123 on host h since <time> (<command>)`` from a lock file, or what is known of it."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return "another process (its lock file names none yet)"
    return (
        f"pid {info.get('pid')} on host {info.get('host')} since {info.get('since')} "
        f"({info.get('command', '?')})"
    )


@contextlib.contextmanager
def exclusive(
    path: str | os.PathLike, *, what: str, wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    Args:
      path: the lock file.
      what: what is locked, for the message (e.g. ``"workdir runs/x"``).
      wait: when given, a busy lock is waited for, after calling ``wait(description of the holder)``
        once; when None, a busy lock raises.

    Raises:
      BusyError: the lock is held by another process (and ``wait`` is None), naming that process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(path)
            if wait is None:
                raise BusyError(
                    f"{what} is in use by {holder} (lock {path}). Wait for that process to finish or stop "
                    "it, or use another directory. The lock is released the moment its holder exits."
                ) from None
            wait(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        yield
    finally:
        os.close(fd)  # Releases the lock; the file stays, naming the last holder.
