"""The process's memory allocator: XLA CPU trains up to 2.2x faster when freed memory stays mapped.

XLA CPU allocates every large buffer afresh at each step, and glibc's malloc serves anything above 32 MiB
with a new ``mmap`` that it unmaps again on free. The kernel then zero-fills every 4 KiB page on first
touch, at every step: writing a new 154 MB array took 50 ms where the same arithmetic into a reused
buffer takes 14 ms. The remedies, all fixed at process start:

- ``'tcmalloc'``: preload gperftools' tcmalloc (Debian/Ubuntu ``libtcmalloc-minimal4``), which keeps
  freed pages mapped for reuse;
- ``'mimalloc'``: preload Microsoft's mimalloc, which does the same and comes from the package index
  (the ``cmeel-mimalloc`` wheel in ``requirements.txt`` ships ``libmimalloc.so``), so a fresh
  ``pip install`` has a fast allocator without a system package;
- ``'hugepages'``: glibc >= 2.35's ``glibc.malloc.hugetlb=1`` tunable, which asks for transparent huge
  pages, so a fault maps 2 MiB instead of 4 KiB; no package needed.

Measured training throughput, 2 cores (``launch/benchmark.py``; see the README's benchmark table):
MobileNetV2 at 64 px 120 img/s with glibc's defaults, 159 with tcmalloc, 188 with huge pages; MedNeXt-tiny
62 / 107 / 92; ConvNeXt-Tiny at 224 px 2.6 / 3.5 / 3.1.

None of them keeps the largest block: XLA CPU allocates all of a step's temporaries as one block (3.2 GB for
MedNeXt-tiny at 224 px, batch 32), and mimalloc 3 (above about 1 GiB) and glibc (above 32 MiB) map such
blocks afresh and unmap them on free. On virtual machines that report freed memory to the host
(virtio-balloon free page reporting, as on these machines), the host reclaims it within a second or two and
the next step pays the host's faults too: MedNeXt's steps alternated between 1.7 and 3.9 s under mimalloc.
So in front of any of the three (not ``'system'``) medjax preloads its huge-block cache
(``csrc/huge_cache.c``, built with the system's C compiler on first use; ``MEDJAX_HUGE_CACHE=0`` leaves it
out), which keeps freed blocks of 256 MiB and more mapped for the next request of about their size:
MedNeXt's steps then took 1.32 s, all of them, and ConvNeXt-Tiny's 3.8 s instead of 5.2-6.9 s. A request
that no kept block can serve unmaps them first, so the cache does not raise the peak (training then
validation then training pays one mapping at each switch).

They act through the environment the dynamic loader reads (``LD_PRELOAD``, ``GLIBC_TUNABLES``), so a
running interpreter cannot switch: the command-line entry points re-execute themselves once with the
variables set (:func:`reexec`). ``--allocator=system`` (or ``MEDJAX_ALLOCATOR=system``) keeps the default.
Under neither preloaded allocator, :func:`describe` says what speed is left and the one command that
fixes it; the commands print it in their first log line.
"""

import ctypes.util
import functools
import os
import sys
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from medjax import native_build
from medjax.errors import MedjaxError

CHOICES = ("auto", "tcmalloc", "mimalloc", "hugepages", "system")
# Preloaded allocators that keep freed pages mapped, best first (what 'auto' picks from).
FAST = ("tcmalloc", "mimalloc")
_MIMALLOC_WHEEL = "cmeel-mimalloc"
FIX_COMMAND = "pip install cmeel-mimalloc==3.4.3"  # The pin of requirements.txt.
_TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
_HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_CACHE_SOURCE = Path(__file__).with_name("csrc") / "huge_cache.c"
_HUGE_CACHE_FLAGS = ("-O2", "-shared", "-fPIC", "-ldl", "-lpthread")
# Set on the re-executed process, so that it never re-executes again, whatever it finds.
_APPLIED = "MEDJAX_ALLOCATOR_APPLIED"


def find_tcmalloc() -> str | None:
    """Path of an installed tcmalloc shared library, or None."""
    for directory in _LIBRARY_DIRS:
        for name in _TCMALLOC_NAMES:
            if (Path(directory) / name).is_file():
                return str(Path(directory) / name)
    found = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    return found if found and Path(found).is_absolute() else None


def find_mimalloc() -> str | None:
    """Path of the ``libmimalloc.so`` that the ``cmeel-mimalloc`` wheel installed, or None."""
    try:
        files = metadata.distribution(_MIMALLOC_WHEEL).files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("libmimalloc.so") and Path(file.locate()).is_file():
            return str(Path(file.locate()).resolve())
    return None


def find(kind: str) -> str | None:
    """Path of the library of :data:`FAST` allocator ``kind``, or None when it is not installed."""
    return {"tcmalloc": find_tcmalloc, "mimalloc": find_mimalloc}[kind]()


def resolve(choice: str) -> str:
    """The allocator ``choice`` means here: ``'auto'`` is the first of :data:`FAST` installed, else
    huge pages."""
    if choice not in CHOICES:
        raise ValueError(f"allocator must be one of {CHOICES}, got {choice!r}")
    if choice == "auto":
        return next((kind for kind in FAST if find(kind)), "hugepages")
    return choice


def environment(choice: str, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with the variables that make a new process use allocator ``choice``.

    Raises:
      FileNotFoundError: ``'tcmalloc'`` or ``'mimalloc'`` was asked for and is not installed.
    """
    env = dict(base)
    kind = resolve(choice)
    if kind in FAST:
        library = find(kind)
        if library is None:
            where = {
                "tcmalloc": f"no libtcmalloc_minimal.so.4 in {', '.join(_LIBRARY_DIRS)}. Install it "
                "(Debian/Ubuntu: apt install libtcmalloc-minimal4)",
                "mimalloc": f"the {_MIMALLOC_WHEEL} package is not installed. Install it ({FIX_COMMAND})",
            }[kind]
            raise FileNotFoundError(
                f"allocator {kind!r} asked for, but {where} or use --allocator=hugepages, which needs no "
                "package."
            )
        env["LD_PRELOAD"] = " ".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
        if kind == "mimalloc":
            # mimalloc returns freed pages to the system after 10 ms by default, and a training step
            # that frees and reallocates its buffers then faults them back in: MobileNetV2's 0.8 s step
            # took 1.4-2.7 s in some steps of two runs in three; with purging off, 1 step in 36.
            env.setdefault("MIMALLOC_PURGE_DELAY", "-1")
    elif kind == "hugepages":
        env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), _HUGEPAGES_TUNABLE) if t)
    if kind != "system" and env.get("MEDJAX_HUGE_CACHE", "1") != "0" and (cache := huge_cache()):
        env["LD_PRELOAD"] = " ".join(p for p in (cache, env.get("LD_PRELOAD", "")) if p)  # First: it wraps.
    return env


@functools.cache
def huge_cache() -> str | None:
    """Path of the huge-block cache library (``csrc/huge_cache.c``), built on first use; None, with a
    warning saying why, without a C compiler or when the build fails."""
    compiler = native_build.compiler((os.environ.get("CC"), "gcc", "cc"))
    if compiler is None:
        warnings.warn(
            "medjax: no C compiler (gcc or $CC), so freed huge blocks go back to the system and each step "
            "maps its temporaries afresh; install one (e.g. `apt install gcc`).",
            stacklevel=2,
        )
        return None
    try:
        return str(
            native_build.shared_library("huge_cache", compiler, (HUGE_CACHE_SOURCE,), _HUGE_CACHE_FLAGS)
        )
    except MedjaxError as e:
        warnings.warn(f"medjax: huge-block cache unavailable: {e}", stacklevel=2)
        return None


def reexec(choice: str) -> None:
    """Replaces this process by the same command under allocator ``choice``; returns if nothing to do.

    Nothing is done for ``'system'``, when ``MEDJAX_ALLOCATOR=system`` is set, or in a process that is
    itself the result of a re-execution. Call it before any work starts: the process is replaced.
    """
    if os.environ.get(_APPLIED):
        return
    kind = resolve(os.environ.get("MEDJAX_ALLOCATOR", choice))
    if kind == "system":
        return
    env = environment(kind, os.environ)
    env[_APPLIED] = kind
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _loaded_libraries() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:  # No procfs (not Linux): only the environment can tell.
        return os.environ.get("LD_PRELOAD", "")


def active() -> str:
    """The allocator this process runs under: a :data:`FAST` one if loaded, 'hugepages' if the tunable
    is set, else 'system'; with ``' + huge-block cache'`` when that is preloaded too."""
    loaded = _loaded_libraries()
    kind = next((kind for kind in FAST if f"lib{kind}" in loaded), None)
    if kind is None:
        kind = "hugepages" if _HUGEPAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "") else "system"
    return kind + (" + huge-block cache" if "/huge_cache-" in loaded else "")


def describe() -> str:
    """:func:`active`, and when it is not a fast allocator, what that costs and the command that fixes it
    (the first log line of a training command)."""
    kind = active()
    if kind.split(" + ")[0] in FAST or not sys.platform.startswith("linux"):  # Preloading is the loader's.
        return kind
    return (
        f"{kind} (no fast allocator found: training runs up to 1.3-2.2x slower than under tcmalloc or "
        f"mimalloc, README 'Performance'; fix: {FIX_COMMAND}, or apt-get install libtcmalloc-minimal4)"
    )
