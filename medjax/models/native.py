"""medjax's native CPU kernels: C++ sources built on first use and called through XLA's FFI.

Six kernels, for what XLA CPU computes in many more passes, or more slowly, than the arithmetic needs:

- the depthwise convolution's kernel gradient (``csrc/depthwise_kernel_grad.cc``): XLA CPU can only express
  it as one small fusion per tap and output row, and dispatching those is most of a MobileNetV2 or MedNeXt
  backward pass (profiled);
- its forward pass, which also serves as the input gradient (``csrc/depthwise_forward.cc``): XLA CPU sums
  kh*kw strided slices of a padded copy, 2.4x PyTorch's time on ConvNeXt's 7x7 at 56x56x96. The forward
  starts its sums at the layer's bias and the kernel gradient also returns the bias's, so neither is an XLA
  pass of its own;
- both again for a convolution whose input is a training-mode BatchNorm's clamped output, normalizing that
  input a row at a time inside the kernel (``csrc/normalized_rows.h``): MobileNetV2's widest maps, its
  expansions' outputs, are then neither written out nor kept for the backward pass (6 % of its step); and
  the input gradient that takes BatchNorm's backward sums of each row it writes, instead of reading it back
  (3 %);
- per-channel sums of ``a`` and ``a * b`` in one pass (``csrc/channel_sums.cc``), BatchNorm's statistics
  and backward reductions: XLA CPU materialises the product and reduces each sum separately;
- LayerNorm over the last axis, forward and backward (``csrc/layer_norm.cc``): XLA CPU reduces each row
  statistic in its own library call and materialises ``x - mean``, ``x_hat`` and ``g * scale`` between them;
- the exact GELU and its derivative with a dense layer's bias added first (``csrc/gelu.cc``): XLA CPU's
  expansions of erf and exp made that fusion 7.6x a ReLU's pass over ConvNeXt's widest map;
- float32 matrix products through oneMKL's sgemm (``csrc/matmul.cc``): on an Intel Xeon XLA CPU's dot took
  1.1-1.4x its time on the narrow products of per-pixel MLPs, up to 1.85x on their weight gradients.
  oneMKL comes from the ``mkl`` wheel (``requirements.txt``, x86-64 Linux); without it, and on CPUs other
  than Intel's, where XLA's dot was the faster, dense layers use XLA's dot (:func:`matmul_preferred`).

The sources are compiled together once per machine with the system's C++ compiler (``$CXX``, else
``g++``/``c++``) for the CPU it runs on, into ``$MEDJAX_CACHE_DIR/native`` (default
``~/.cache/medjax/native``), keyed by the sources, the jax version and the compiler, and registered as XLA
FFI targets. Without a compiler, or when the build fails, medjax falls back to its pure-XLA path and says
why once; ``MEDJAX_NATIVE=0`` turns the native path off.
"""

import ctypes
import functools
import importlib.metadata
import math
import os
import platform
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from medjax import native_build
from medjax.errors import MedjaxError

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(
    CSRC / f"{name}.cc"
    for name in (
        "depthwise_forward",
        "depthwise_kernel_grad",
        "channel_sums",
        "layer_norm",
        "gelu",
        "matmul",
        "patches",
    )
)
HEADERS = (CSRC / "simd.h", CSRC / "tasks.h", CSRC / "normalized_rows.h")
FORWARD = "medjax_depthwise_forward"
KERNEL_GRAD = "medjax_depthwise_kernel_grad"
FORWARD_WITH_BIAS = "medjax_depthwise_forward_with_bias"
KERNEL_AND_BIAS_GRAD = "medjax_depthwise_kernel_and_bias_grad"
INPUT_GRAD_CLAMPED_SUMS = "medjax_depthwise_input_grad_clamped_sums"
NORMALIZED_FORWARD = "medjax_normalized_depthwise_forward"
NORMALIZED_KERNEL_GRAD = "medjax_normalized_depthwise_kernel_grad"
CHANNEL_SUMS = "medjax_channel_sums"
CLAMPED_CHANNEL_SUMS = "medjax_clamped_channel_sums"
LAYER_NORM = "medjax_layer_norm_forward"
LAYER_NORM_BACKWARD = "medjax_layer_norm_backward"
GELU = "medjax_gelu"
GELU_VALUE = "medjax_gelu_value"
MATMUL = "medjax_matmul"
PATCHES = "medjax_patches"
_SYMBOLS = {
    FORWARD: "MedjaxDepthwiseForward",
    KERNEL_GRAD: "MedjaxDepthwiseKernelGrad",
    FORWARD_WITH_BIAS: "MedjaxDepthwiseForwardWithBias",
    KERNEL_AND_BIAS_GRAD: "MedjaxDepthwiseKernelAndBiasGrad",
    INPUT_GRAD_CLAMPED_SUMS: "MedjaxDepthwiseInputGradClampedSums",
    NORMALIZED_FORWARD: "MedjaxNormalizedDepthwiseForward",
    NORMALIZED_KERNEL_GRAD: "MedjaxNormalizedDepthwiseKernelGrad",
    CHANNEL_SUMS: "MedjaxChannelSums",
    CLAMPED_CHANNEL_SUMS: "MedjaxClampedChannelSums",
    LAYER_NORM: "MedjaxLayerNormForward",
    LAYER_NORM_BACKWARD: "MedjaxLayerNormBackward",
    GELU: "MedjaxGelu",
    GELU_VALUE: "MedjaxGeluValue",
    PATCHES: "MedjaxPatches",
    MATMUL: "MedjaxMatmul",
}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


def _compiler() -> str | None:
    return native_build.compiler((os.environ.get("CXX"), "g++", "c++"))


def build(compiler: str) -> Path:
    """Compiles :data:`SOURCES` into one shared library (unless this exact build is cached) and returns it.

    Raises:
      MedjaxError: when the compiler fails, with its messages.
    """
    flags = (*_FLAGS, f"-I{jax.ffi.include_dir()}")
    return native_build.shared_library(
        "medjax_native", compiler, SOURCES, flags, inputs=HEADERS, key_parts=(jax.__version__,)
    )


# A jax.jit cache key: a function traced inside xla_only() is traced anew, never served a native trace.
_XLA_ONLY = jax.make_user_context(default_value=False)


def xla_only():
    """A context within which medjax's layers trace XLA's operations only (:func:`available` says no): for
    programs that leave this process, such as ``jax.export`` artifacts and ONNX graphs, which cannot carry
    the custom calls registered here. Jitted functions called within it are traced again."""
    return _XLA_ONLY(True)


def available() -> bool:
    """Whether medjax may call its native kernels: they are built and registered (on the first call, see
    :func:`_registered`) and no :func:`xla_only` is in effect."""
    return not _XLA_ONLY.value and _registered()


@functools.cache
def _registered() -> bool:
    """Whether the native kernels are built and registered (building them on the first call).

    Only on the CPU backend with one device in all: the kernels are CPU code, and a program partitioned
    over several devices (simulated ones, or ``jax.distributed`` processes) would have XLA gather each
    call's operands onto every device, which then computes the whole batch's call; XLA's own operations
    partition. Seen with 4 simulated devices: a dense layer's product computed on all 64 rows of a batch
    of 64 on each device, after an all-gather.
    """
    if os.environ.get("MEDJAX_NATIVE", "1") == "0" or jax.default_backend() != "cpu":
        return False
    if (devices := jax.device_count()) > 1:
        warnings.warn(
            f"medjax: {devices} devices, so its native CPU kernels are off (XLA would gather each call's "
            "operands onto every device); the pure-XLA path partitions the work instead.",
            stacklevel=2,
        )
        return False
    compiler = _compiler()
    if compiler is None:
        warnings.warn(
            "medjax: no C++ compiler (g++ or $CXX) found, so depthwise convolutions, BatchNorm, LayerNorm "
            "and GELU use the slower pure-XLA path; install one (e.g. `apt install g++`) to build medjax's "
            "native kernels.",
            stacklevel=2,
        )
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build(compiler)))
    except (MedjaxError, OSError) as e:  # An optional speed-up must not stop training: say why, fall back.
        warnings.warn(f"medjax: native kernels unavailable, using the pure-XLA path: {e}", stacklevel=2)
        return False
    for target, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    if (mkl := _mkl()) is not None:
        library.MedjaxSetSgemm(ctypes.cast(mkl.cblas_sgemm, ctypes.c_void_p))
    return True


# oneMKL's runtime-dispatch library: its interface and threading layers are chosen by call, before use.
_MKL_RUNTIME = "libmkl_rt.so"
_MKL_INTERFACE_LP64 = 0  # 32-bit integers, as csrc/matmul.cc declares cblas_sgemm.
_MKL_THREADING_SEQUENTIAL = 1  # csrc/matmul.cc splits the work across XLA's threads itself.


def _mkl_path() -> Path | None:
    """oneMKL's runtime library: ``$MEDJAX_MKL`` when it names one, else the one the ``mkl`` wheel
    installed, else None."""
    if (path := os.environ.get("MEDJAX_MKL", "")) not in ("", "0", "1"):
        return Path(path)
    try:
        files = importlib.metadata.files("mkl") or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [Path(f.locate()) for f in files if f.name.startswith(_MKL_RUNTIME)]
    return min(found, key=lambda p: len(p.name)) if found else None


@functools.cache
def _mkl() -> ctypes.CDLL | None:
    """oneMKL, loaded and set to LP64 and sequential, or None (having said why where it matters). Cached,
    which also keeps the library loaded for as long as the kernels may call it."""
    path = _mkl_path()
    if path is None:
        # Only where oneMKL would be chosen (matmul_preferred): elsewhere XLA's dot is the faster anyway.
        if platform.system() == "Linux" and platform.machine() == "x86_64" and cpu_vendor() == "GenuineIntel":
            warnings.warn(
                "medjax: oneMKL (the `mkl` package in requirements.txt) is not installed, so dense layers "
                "use XLA's dot, which trained ConvNeXt-Tiny about 11 % slower on an Intel Xeon; `pip install "
                "-r requirements.txt` brings it.",
                stacklevel=3,
            )
        return None
    try:
        mkl = ctypes.CDLL(str(path))
        mkl.MKL_Set_Interface_Layer(_MKL_INTERFACE_LP64)
        mkl.MKL_Set_Threading_Layer(_MKL_THREADING_SEQUENTIAL)
    except (OSError, AttributeError) as e:  # A speed-up, not a requirement: say why and fall back.
        warnings.warn(
            f"medjax: could not load oneMKL from {path} ({e}); dense layers use XLA's dot.", stacklevel=3
        )
        return None
    return mkl


def matmul_available() -> bool:
    """Whether :func:`matmul` can run: the native kernels are available and oneMKL was loaded and its sgemm
    handed to them. ``MEDJAX_MKL=0`` says no; ``MEDJAX_MKL=<path>`` names another ``libmkl_rt.so``."""
    return available() and os.environ.get("MEDJAX_MKL") != "0" and _mkl() is not None


def matmul_preferred() -> bool:
    """Whether medjax's layers compute their products with :func:`matmul` rather than XLA's dot: where it
    is available, on an Intel CPU, or on any CPU with ``MEDJAX_MKL=1`` (or a path).

    oneMKL picks its kernels by CPU vendor. On an Intel Xeon with AVX-512 it beat XLA's dot by 1.1-1.85x
    on ConvNeXt-Tiny's products; on an AMD EPYC with AVX-512 XLA's dot took 0.86x oneMKL's time summed over
    the same products (``launch/bench_matmul.py``) and trained ConvNeXt-Tiny 1.10-1.15x faster (README
    'Performance')."""
    forced = os.environ.get("MEDJAX_MKL", "") not in ("", "0")
    return (forced or cpu_vendor() == "GenuineIntel") and matmul_available()


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...) from ``/proc/cpuinfo``, or '' where
    there is none to read."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")


def _call(target: str, out, *args: jax.Array, **attrs: int | float):
    """Calls native ``target`` on ``args`` in float32 (integer attributes as the handlers' int64, floats as
    float32); ``out`` is one ``jax.ShapeDtypeStruct`` or a tuple of them."""
    if not available():
        raise MedjaxError("medjax's native kernels are unavailable (no C++ compiler, or MEDJAX_NATIVE=0).")
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    attrs = {k: np.float32(v) if isinstance(v, float) else np.int64(v) for k, v in attrs.items()}
    return call(*(a.astype(jnp.float32) for a in args), **attrs)


MAX_FORWARD_KERNEL_WIDTH = 64  # csrc/depthwise_forward.cc keeps one phase's tap columns in a fixed array.

# Outputs of the depthwise forward kernel at least this large are written with streaming stores (the
# `stream` attribute, csrc/simd.h's StreamCopy), which skip reading each line before writing it but leave
# nothing in cache for the next operation: worth it where the output could not stay in the last-level cache
# anyway (32 MiB on the AMD EPYC measured; MobileNetV2's 112x112 and 56x56 maps at batch 32 are 38-154 MB).
STREAM_OUTPUT_BYTES = 32 << 20


def _stream(out: jax.ShapeDtypeStruct) -> int:
    """The ``stream`` attribute of a depthwise forward kernel writing ``out``."""
    return int(math.prod(out.shape) * out.dtype.itemsize >= STREAM_OUTPUT_BYTES)


def forward_supports(kernel_shape, strides, padding, input_dilation) -> bool:
    """Whether :func:`depthwise_forward` computes this geometry: padding, not cropping; kernel width up to
    :data:`MAX_FORWARD_KERNEL_WIDTH`; a stride and an input dilation not both above 1 along an axis."""
    return (
        min(min(p) for p in padding) >= 0
        and kernel_shape[1] <= MAX_FORWARD_KERNEL_WIDTH
        and all(min(s, e) == 1 for s, e in zip(strides, input_dilation, strict=True))
    )


def depthwise_forward(
    x: jax.Array,
    kernel: jax.Array,
    strides,
    padding,
    dilation,
    input_dilation=(1, 1),
    bias: jax.Array | None = None,
):
    """``y[n, oh, ow, c] = sum over (i, j) of xe[n, oh*sh + i*dh - top, ow*sw + j*dw - left, c] * k[i, j, c]``
    with ``xe`` the input dilated by ``input_dilation`` (zeros between its elements) and read as zero outside
    its bounds: the forward pass of a depthwise convolution, and with the stride as ``input_dilation`` the
    input gradient of a strided one. Neither the padding nor the dilation is materialised.

    Args:
      x: ``(N, H, W, C)`` input (computed in float32).
      kernel: ``(kh, kw, 1, C)``.
      strides, dilation, input_dilation: pairs; padding: ``((top, bottom), (left, right))``; the geometry
        must pass :func:`forward_supports`.
      bias: ``(C,)`` added to every output, as the sums' starting value (not with ``input_dilation``).
    Returns:
      float32 ``(N, H', W', C)``.
    """
    if not forward_supports(kernel.shape, strides, padding, input_dilation):
        raise ValueError(
            f"The native depthwise forward does not compute kernel {kernel.shape}, strides {strides}, "
            f"padding {padding}, input dilation {input_dilation}: see native.forward_supports."
        )
    (sh, sw), (dh, dw), (eh, ew) = strides, dilation, input_dilation
    out = _forward_shape(x.shape, kernel.shape, strides, padding, dilation, input_dilation)
    (pt, _), (pl, _) = padding
    attrs = dict(sh=sh, sw=sw, dh=dh, dw=dw, pt=pt, pl=pl, stream=_stream(out))
    if bias is None:
        return _call(FORWARD, out, x, kernel, eh=eh, ew=ew, **attrs)
    if (eh, ew) != (1, 1):
        raise ValueError("The native depthwise forward adds a bias only without input dilation.")
    return _call(FORWARD_WITH_BIAS, out, x, kernel, bias, **attrs)


def _forward_shape(x_shape, kernel_shape, strides, padding, dilation, input_dilation) -> jax.ShapeDtypeStruct:
    out_hw = [
        ((size - 1) * e + 1 + lo + hi - (k - 1) * d - 1) // s + 1
        for size, (lo, hi), k, d, s, e in zip(
            x_shape[1:3], padding, kernel_shape[:2], dilation, strides, input_dilation, strict=True
        )
    ]
    return jax.ShapeDtypeStruct((x_shape[0], *out_hw, x_shape[3]), jnp.float32)


def depthwise_forward_clamped_sums(x, kernel, padding, input_dilation, bn_input, mean, mul, bias, lo, hi):
    """:func:`depthwise_forward` at stride 1 with an undilated kernel (an input gradient: ``x`` the cotangent,
    the kernel flipped, the stride as ``input_dilation``) and :func:`clamped_channel_sums` of its output
    with ``bn_input``, summed from each output row while it is in cache.

    Args:
      bn_input: the clamped BatchNorm's input, shaped as the output; mean, mul, bias: ``(C,)``; lo, hi: the
        clamp.
    Returns:
      float32 ``(y, sum(ym), sum(ym * bn_input))``, ``ym`` the output where the BatchNorm's output lies in
      ``(lo, hi)``.
    """
    out = _forward_shape(x.shape, kernel.shape, (1, 1), padding, (1, 1), input_dilation)
    if not forward_supports(kernel.shape, (1, 1), padding, input_dilation) or out.shape != bn_input.shape:
        raise ValueError(
            f"The native depthwise input gradient does not compute kernel {kernel.shape}, padding {padding}, "
            f"input dilation {input_dilation} into {bn_input.shape}: see native.forward_supports."
        )
    (pt, _), (pl, _), (eh, ew) = *padding, input_dilation
    sums = jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)
    attrs = dict(pt=pt, pl=pl, eh=eh, ew=ew, lo=float(lo), hi=float(hi), stream=_stream(out))
    return _call(INPUT_GRAD_CLAMPED_SUMS, (out, sums, sums), x, kernel, bn_input, mean, mul, bias, **attrs)


def normalized_supports(kernel_shape, padding, dilation) -> bool:
    """Whether :func:`normalized_depthwise_forward` and its kernel gradient compute this geometry: an
    undilated kernel (``csrc/normalized_rows.h`` caches the consecutive rows it reads) that
    :func:`forward_supports` takes."""
    return tuple(dilation) == (1, 1) and forward_supports(kernel_shape, (1, 1), padding, (1, 1))


def _normalized_attrs(kernel_shape, strides, padding, dilation, lo: float, hi: float) -> dict:
    if not normalized_supports(kernel_shape, padding, dilation):
        raise ValueError(
            f"The normalized depthwise kernels do not compute kernel {tuple(kernel_shape)}, padding "
            f"{padding}, dilation {dilation}: see native.normalized_supports."
        )
    (sh, sw), ((pt, _), (pl, _)) = strides, padding
    return dict(sh=sh, sw=sw, pt=pt, pl=pl, lo=float(lo), hi=float(hi))


def normalized_depthwise_forward(x, mean, mul, bias, kernel, strides, padding, lo: float, hi: float):
    """:func:`depthwise_forward` (undilated) of ``clip((x - mean) * mul + bias, lo, hi)``, a training-mode
    BatchNorm and the clamp after it (ReLU6: ``0, 6``; ReLU: ``0, inf``), computed from ``x`` a row at a time
    inside the kernel, never written out whole.

    Args:
      x: ``(N, H, W, C)`` BatchNorm input; mean, mul, bias: ``(C,)``; kernel: ``(kh, kw, 1, C)``; strides:
        a pair; padding: ``((top, bottom), (left, right))`` of the normalized map, at least 0.
    Returns:
      float32 ``(N, H', W', C)``.
    """
    attrs = _normalized_attrs(kernel.shape, strides, padding, (1, 1), lo, hi)
    out = _forward_shape(x.shape, kernel.shape, strides, padding, (1, 1), (1, 1))
    return _call(NORMALIZED_FORWARD, out, x, mean, mul, bias, kernel, stream=_stream(out), **attrs)


def normalized_depthwise_kernel_grad(x, mean, mul, bias, g, kernel_shape, strides, padding, lo, hi):
    """:func:`depthwise_kernel_grad` (undilated) with the input of :func:`normalized_depthwise_forward`,
    normalized and clamped from ``x`` inside the kernel.

    Returns:
      float32 ``kernel_shape``.
    """
    attrs = _normalized_attrs(kernel_shape, strides, padding, (1, 1), lo, hi)
    out = jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)
    kh, kw = kernel_shape[:2]
    return _call(NORMALIZED_KERNEL_GRAD, out, x, mean, mul, bias, g, kh=kh, kw=kw, **attrs)


def depthwise_kernel_grad(x: jax.Array, g: jax.Array, kernel_shape, strides, padding, dilation) -> jax.Array:
    """``dk[i, j, 0, c] = sum over (n, oh, ow) of x[n, oh*sh + i*dh - top, ow*sw + j*dw - left, c] * g[n, oh,
    ow, c]``, ``x`` read as zero outside its bounds (the padding is not materialised).

    Args:
      x: ``(N, H, W, C)`` input; g: ``(N, H', W', C)`` cotangent (computed in float32).
      kernel_shape: ``(kh, kw, 1, C)``; strides, dilation: pairs; padding: ``((top, bottom), (left,
        right))``, each at least 0.
    Returns:
      float32 ``kernel_shape``.
    """
    out = jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)
    return _call(KERNEL_GRAD, out, x, g, **_kernel_grad_attrs(kernel_shape, strides, padding, dilation))


def depthwise_kernel_and_bias_grad(x, g, kernel_shape, strides, padding, dilation):
    """:func:`depthwise_kernel_grad` and the bias's gradient, ``db[c] = sum over (n, oh, ow) of g[n, oh, ow,
    c]``, from one pass.

    Returns:
      float32 ``(dk, db)``, shaped ``kernel_shape`` and ``(C,)``.
    """
    out = (
        jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32),
        jax.ShapeDtypeStruct((g.shape[-1],), jnp.float32),
    )
    return _call(
        KERNEL_AND_BIAS_GRAD, out, x, g, **_kernel_grad_attrs(kernel_shape, strides, padding, dilation)
    )


def _kernel_grad_attrs(kernel_shape, strides, padding, dilation) -> dict[str, int]:
    if min(min(p) for p in padding) < 0:
        raise ValueError(f"The native depthwise kernel gradient pads, it does not crop: padding {padding}.")
    (kh, kw), (sh, sw), (dh, dw), ((pt, _), (pl, _)) = kernel_shape[:2], strides, dilation, padding
    return dict(kh=kh, kw=kw, sh=sh, sw=sw, dh=dh, dw=dw, pt=pt, pl=pl)


def _column_sums(target: str, a: jax.Array, b: jax.Array, *params: jax.Array, **attrs: float):
    """Two float32 ``(C,)`` sums over every axis but the last from ``target``, called on ``a`` and ``b`` (one
    shape ``(..., C)``) as ``(rows, C)`` arrays, then ``params``."""
    if a.shape != b.shape:
        raise ValueError(f"{target} needs two arrays of one shape, got {a.shape} and {b.shape}.")
    c = a.shape[-1]
    out = jax.ShapeDtypeStruct((c,), jnp.float32)
    return _call(target, (out, out), a.reshape(-1, c), b.reshape(-1, c), *params, **attrs)


def channel_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum(a), sum(a * b))`` over every axis but the last, in one pass over both (accumulated in double).

    Args:
      a, b: arrays of one shape ``(..., C)`` (computed in float32); ``b`` may be ``a`` itself.
    Returns:
      Two float32 ``(C,)`` arrays.
    """
    return _column_sums(CHANNEL_SUMS, a, b)


def clamped_channel_sums(g, x, mean, mul, bias, lo: float, hi: float) -> tuple[jax.Array, jax.Array]:
    """BatchNorm's backward sums through a clamp that follows it: ``(sum(gm), sum(gm * x))`` over every axis
    but the last, ``gm = where(lo < z < hi, g, 0)`` with ``z = (x - mean) * mul + bias`` the BatchNorm's
    output, recomputed from ``x`` (ReLU: ``lo, hi = 0, inf``; ReLU6: ``0, 6``). One pass over ``g`` and ``x``.

    Args:
      g, x: float32 arrays of one shape ``(..., C)``; mean, mul, bias: ``(C,)``.
    Returns:
      Two float32 ``(C,)`` arrays.
    """
    return _column_sums(CLAMPED_CHANNEL_SUMS, g, x, mean, mul, bias, lo=float(lo), hi=float(hi))


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """LayerNorm over the last axis, ``(x - mean) * rstd * scale + bias`` with ``rstd = 1 / sqrt(var +
    epsilon)`` (the row's biased variance, computed from ``x - mean``).

    Args:
      x: ``(..., C)`` (computed in float32); scale, bias: ``(C,)``.
    Returns:
      float32 ``y`` shaped as ``x``, and each row's ``mean`` and ``rstd``, shaped ``x.shape[:-1]``.
    """
    c = x.shape[-1]
    rows = x.reshape(-1, c)
    stat = jax.ShapeDtypeStruct((rows.shape[0],), jnp.float32)
    out = (jax.ShapeDtypeStruct(rows.shape, jnp.float32), stat, stat)
    y, mean, rstd = _call(LAYER_NORM, out, rows, scale, bias, eps=float(epsilon))
    return y.reshape(x.shape), mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1])


def layer_norm_backward(g: jax.Array, x: jax.Array, scale: jax.Array, mean: jax.Array, rstd: jax.Array):
    """The gradients of :func:`layer_norm` for its output's cotangent ``g``, from its input and the row
    statistics it returned; ``dscale`` and ``dbias`` are summed over rows in double.

    Returns:
      float32 ``(dx, dscale, dbias)``, shaped as ``x``, ``(C,)`` and ``(C,)``.
    """
    c = x.shape[-1]
    rows = x.reshape(-1, c)
    param = jax.ShapeDtypeStruct((c,), jnp.float32)
    out = (jax.ShapeDtypeStruct(rows.shape, jnp.float32), param, param)
    dx, dscale, dbias = _call(
        LAYER_NORM_BACKWARD, out, g.reshape(-1, c), rows, scale, mean.reshape(-1), rstd.reshape(-1)
    )
    return dx.reshape(x.shape), dscale, dbias


def _gelu_rows(x: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` as ``(rows, C)`` and ``bias`` broadcast to ``(C,)``, the GELU kernels' operands."""
    c = x.shape[-1] if x.ndim else 1
    return x.reshape(-1, c), jnp.broadcast_to(bias, (c,))


def gelu(x: jax.Array, bias: jax.Array):
    """The exact GELU of ``z = x + bias`` and its derivative: ``(z * Phi(z), Phi(z) + z * phi(z))``, with
    ``Phi`` the standard normal CDF (erf approximated as XLA does for float32) and ``phi`` its density.

    Args:
      x: ``(..., C)`` (computed in float32); bias: ``(C,)`` or a scalar, added to every row.
    Returns:
      float32 ``(y, d)``, each shaped as ``x``.
    """
    rows, bias = _gelu_rows(x, bias)
    out = jax.ShapeDtypeStruct(rows.shape, jnp.float32)
    y, d = _call(GELU, (out, out), rows, bias)
    return y.reshape(x.shape), d.reshape(x.shape)


def gelu_value(x: jax.Array, bias: jax.Array) -> jax.Array:
    """:func:`gelu`'s ``y`` alone, in one pass that neither computes nor writes the derivative
    (evaluation)."""
    rows, bias = _gelu_rows(x, bias)
    return _call(GELU_VALUE, jax.ShapeDtypeStruct(rows.shape, jnp.float32), rows, bias).reshape(x.shape)


def patches(x: jax.Array, kernel_size, strides) -> jax.Array:
    """``(N, H, W, C)`` (already padded) -> ``(N, H', W', kh*kw*C)``: each output pixel's receptive field
    under a ``kernel_size`` kernel at ``strides``, ordered (row, column, channel) like a flattened
    ``(kh, kw, C, F)`` kernel (``layers._patches``, computed by XLA elsewhere).

    Returns:
      float32 ``(N, H', W', kh*kw*C)``.
    """
    (kh, kw), (sh, sw) = kernel_size, strides
    n, h, w, c = x.shape
    out = jax.ShapeDtypeStruct((n, (h - kh) // sh + 1, (w - kw) // sw + 1, kh * kw * c), jnp.float32)
    return _call(PATCHES, out, x, kh=kh, kw=kw, sh=sh, sw=sw)


def matmul(a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """``op(a) @ op(b)`` of 2-D float32 arrays through oneMKL's sgemm, ``op`` transposing where asked (the
    transposes are not materialised). Needs :func:`matmul_available`.

    Args:
      a: ``(m, k)``, or ``(k, m)`` with ``transpose_a``; b: ``(k, n)``, or ``(n, k)`` with ``transpose_b``.
    Returns:
      float32 ``(m, n)``.
    """
    m, k = a.shape[::-1] if transpose_a else a.shape
    kb, n = b.shape[::-1] if transpose_b else b.shape
    if k != kb:
        raise ValueError(f"matmul: op(a) is {(m, k)} and op(b) is {(kb, n)}; the inner sizes differ.")
    if not matmul_available():
        raise MedjaxError("medjax's native matmul is unavailable (no native kernels, or no oneMKL).")
    if transpose_a and not transpose_b and m > n and k >= 2 * m:
        # A weight gradient a^T @ g over a long contraction is faster as (g^T @ a)^T when the output is
        # taller than wide: oneMKL took 40 ms for ConvNeXt-Tiny's (100,352 x 384)^T @ (100,352 x 96) and
        # 26 ms for the swapped product and its transpose; at k < 2 m (its last stage) swapping was slower.
        return _call(MATMUL, jax.ShapeDtypeStruct((n, m), jnp.float32), b, a, ta=1, tb=0).T
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return _call(MATMUL, out, a, b, ta=int(transpose_a), tb=int(transpose_b))
