"""medjax's native CPU kernels: C++ sources built on first use and called through XLA's FFI.

One kernel so far, the depthwise convolution's kernel gradient (``csrc/depthwise_kernel_grad.cc``):
XLA CPU can only express it as one small fusion per tap and output row, and dispatching those is most
of a MobileNetV2 or MedNeXt backward pass (profiled). The source is compiled once per machine
with the system's C++ compiler (``$CXX``, else ``g++``/``c++``) for the CPU it runs on, into
``$MEDJAX_CACHE_DIR/native`` (default ``~/.cache/medjax/native``), keyed by the source, the jax version
and the compiler, and registered as an XLA FFI target. Without a compiler, or when the build fails,
medjax falls back to its pure-XLA path and says why once; ``MEDJAX_NATIVE=0`` turns the native path off.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from medjax.errors import MedjaxError

SOURCE = Path(__file__).with_name("csrc") / "depthwise_kernel_grad.cc"
TARGET = "medjax_depthwise_kernel_grad"
_SYMBOL = "MedjaxDepthwiseKernelGrad"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CXX"), "g++", "c++")):
        if path := shutil.which(name):
            return path
    return None


def _cache_dir() -> Path:
    root = os.environ.get("MEDJAX_CACHE_DIR") or Path.home() / ".cache" / "medjax"
    return Path(root) / "native"


def build(compiler: str) -> Path:
    """Compiles :data:`SOURCE` (unless this exact build is cached) and returns the shared library.

    Raises:
      MedjaxError: when the compiler fails, with its messages.
    """
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (SOURCE.read_text(), jax.__version__, version, " ".join(_FLAGS)))
    ).hexdigest()[:16]
    library = _cache_dir() / f"{SOURCE.stem}-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: concurrent first uses never load a half-written file.
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(partial)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise MedjaxError(f"Building {SOURCE.name} failed ({' '.join(cmd)}):\n{result.stderr[-3000:]}")
    partial.replace(library)
    return library


@functools.cache
def available() -> bool:
    """Whether the native kernel is built and registered (building it on the first call)."""
    if os.environ.get("MEDJAX_NATIVE", "1") == "0":
        return False
    compiler = _compiler()
    if compiler is None:
        warnings.warn(
            "medjax: no C++ compiler (g++ or $CXX) found, so depthwise kernel gradients use the slower "
            "pure-XLA path; install one (e.g. `apt install g++`) to build medjax's native kernel.",
            stacklevel=2,
        )
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build(compiler)))
    except (MedjaxError, OSError) as e:  # An optional speed-up must not stop training: say why, fall back.
        warnings.warn(f"medjax: native kernel unavailable, using the pure-XLA path: {e}", stacklevel=2)
        return False
    capsule = jax.ffi.pycapsule(getattr(library, _SYMBOL))
    jax.ffi.register_ffi_target(TARGET, capsule, platform="cpu")
    return True


def depthwise_kernel_grad(
    xp: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...], strides, dilation
) -> jax.Array:
    """``dk[i, j, 0, c] = sum over (n, oh, ow) of xp[n, oh*sh + i*dh, ow*sw + j*dw, c] * g[n, oh, ow, c]``.

    Args:
      xp: ``(N, Hp, Wp, C)`` padded input; g: ``(N, H', W', C)`` cotangent (computed in float32).
      kernel_shape: ``(kh, kw, 1, C)``; strides, dilation: pairs.
    Returns:
      float32 ``kernel_shape``.
    """
    if not available():
        raise MedjaxError("The native depthwise kernel is unavailable (no C++ compiler, or MEDJAX_NATIVE=0).")
    (kh, kw), (sh, sw), (dh, dw) = kernel_shape[:2], strides, dilation
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32), vmap_method="sequential"
    )
    attrs = {"kh": kh, "kw": kw, "sh": sh, "sw": sw, "dh": dh, "dw": dw}
    return call(xp.astype(jnp.float32), g.astype(jnp.float32), **{k: np.int64(v) for k, v in attrs.items()})
