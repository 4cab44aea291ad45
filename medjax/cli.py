"""What every medjax command does before and around its work, in one place.

Training commands run under a memory allocator that keeps freed pages mapped (:mod:`medjax.allocator`),
re-executing themselves once to get it. Orbax and TFDS log every file operation at INFO, so unless
``--verbosity`` is given a command shows warnings and its own lines only. A persistent XLA compilation
cache lets a resumed or repeated run skip recompiling its steps.

Every command's ``main`` runs through :func:`run`, so a failure the user can fix (a
:class:`~medjax.errors.MedjaxError`, or a full disk, a read-only or forbidden path) ends the process with
one ``medjax: error:`` paragraph and exit status 1, not a traceback through library frames;
``--verbosity=1`` or ``MEDJAX_VERBOSE=1`` prints the traceback as well.
"""

import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from absl import app, flags, logging

from medjax import allocator
from medjax.errors import MedjaxError

VERBOSE_ENV = "MEDJAX_VERBOSE"
# Operating-system failures whose message (with the file name Python puts in it) is the whole story.
_USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE})


def define_allocator_flag() -> flags.FlagHolder:
    """The ``--allocator`` flag of the commands that train (``medjax.launch``, ``launch/reproduce.py``)."""
    return flags.DEFINE_enum(
        "allocator",
        "auto",
        allocator.CHOICES,
        "Memory allocator (medjax/allocator.py): 'auto' is tcmalloc when installed, else mimalloc (from "
        "requirements.txt), else glibc huge pages; 'system' keeps glibc's defaults (also "
        "MEDJAX_ALLOCATOR=system). Training is up to 2.2x faster under tcmalloc or mimalloc.",
    )


def setup(*, compilation_cache_dir: str | None = None, memory_allocator: str | None = None) -> None:
    """Quiets library logs (unless ``--verbosity`` was given) and enables the compilation cache if set.

    With ``memory_allocator`` set, first re-executes the command under it (:func:`allocator.reexec`).
    """
    if memory_allocator:
        allocator.reexec(memory_allocator)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if compilation_cache_dir:
        import jax  # Late: `--help` of the commands stays fast.

        jax.config.update("jax_compilation_cache_dir", str(Path(compilation_cache_dir).expanduser()))


def verbose() -> bool:
    """Whether failures show their traceback: ``--verbosity`` >= 1 or ``MEDJAX_VERBOSE`` set (not 0)."""
    if os.environ.get(VERBOSE_ENV, "0") not in ("", "0"):
        return True
    if "verbosity" not in flags.FLAGS:
        return False
    holder = flags.FLAGS["verbosity"]
    return bool(holder.present and holder.value >= 1)


def _os_cause(error: BaseException) -> OSError | None:
    """The operating-system failure behind ``error``: itself or an exception it was raised from
    (Orbax and TensorStore wrap a full disk in their own types)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _USER_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def is_user_error(error: BaseException) -> bool:
    """Errors reported as a ``medjax: error:`` paragraph (everything else keeps its traceback)."""
    return isinstance(error, MedjaxError) or _os_cause(error) is not None


def error_paragraph(error: BaseException) -> str:
    """``medjax: error: <message>`` with blank lines squeezed out, so it reads as one paragraph."""
    if isinstance(error, MedjaxError):
        text = str(error)
    else:
        cause = _os_cause(error) or error
        text = f"{cause.strerror}: {_filenames(cause)}"
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    return "medjax: error: " + "\n".join(lines)


def _filenames(error: OSError) -> str:
    names = [n for n in (error.filename, error.filename2) if n is not None]
    return ", ".join(os.fsdecode(n) for n in names) or str(error)


def guard(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """``main`` with user-facing failures turned into one paragraph on stderr and exit status 1."""

    @functools.wraps(main)
    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except Exception as e:
            if not is_user_error(e):
                raise
            if verbose():
                traceback.print_exc()
            print(error_paragraph(e), file=sys.stderr, flush=True)
            sys.exit(1)

    return guarded


def run(main: Callable[[list[str]], None], **kwargs) -> None:
    """``absl.app.run`` of :func:`guard` (``main``); ``kwargs`` go to ``app.run`` (e.g. ``flags_parser``)."""
    app.run(guard(main), **kwargs)
