"""Building medjax's C and C++ sources into shared libraries, once per machine, cached by content.

Used by :mod:`medjax.models.native` (the XLA FFI kernels) and :mod:`medjax.allocator` (the huge-block
cache preloaded ahead of the allocator), so it imports nothing heavy: the allocator builds before jax
is loaded. Libraries go to ``$MEDJAX_CACHE_DIR/native`` (default ``~/.cache/medjax/native``), named by a
hash of the sources, the compiler's version, the flags and any ``key_parts``.
"""

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from medjax.errors import MedjaxError


def compiler(names: Sequence[str]) -> str | None:
    """The first of ``names`` (``None`` entries skipped) found on ``PATH``, or None."""
    for name in filter(None, names):
        if path := shutil.which(name):
            return path
    return None


def cache_dir() -> Path:
    root = os.environ.get("MEDJAX_CACHE_DIR") or Path.home() / ".cache" / "medjax"
    return Path(root) / "native"


def shared_library(
    name: str,
    compiler_path: str,
    sources: Sequence[Path],
    flags: Sequence[str],
    *,
    inputs: Sequence[Path] = (),
    key_parts: Sequence[str] = (),
) -> Path:
    """Compiles ``sources`` with ``flags`` into ``<cache>/<name>-<key>.so`` unless that build is cached, and
    returns it. ``inputs`` (headers) and ``key_parts`` enter the key without being compiled.

    Raises:
      MedjaxError: when the compiler fails, with its messages.
    """
    version = subprocess.run([compiler_path, "--version"], capture_output=True, text=True).stdout
    parts = (*(f.read_text() for f in (*sources, *inputs)), *key_parts, version, *flags)
    key = hashlib.sha256(b"\0".join(part.encode() for part in parts)).hexdigest()[:16]
    library = cache_dir() / f"{name}-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: concurrent first uses never load a half-written file.
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    cmd = [compiler_path, *flags, *map(str, sources), "-o", str(partial)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        names = ", ".join(f.name for f in sources)
        raise MedjaxError(f"Building {names} failed ({' '.join(cmd)}):\n{result.stderr[-3000:]}")
    partial.replace(library)
    return library
