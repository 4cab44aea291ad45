"""Depthwise 2-D convolution for XLA CPU.

XLA's grouped convolution (``feature_group_count=C``) is pathologically slow on CPU (DESIGN.md §4), and
every medjax architecture is built on depthwise convolutions. ``impl='xla'`` is the reference path;
``impl='fast'`` is the path models use by default: medjax's native kernels for the forward pass and both
gradients when a C++ compiler is there to build them (``'native'``), else shifted multiply-adds with a
hand-written VJP whose kernel gradient is a pure-XLA loop (``'loop'``).

The kernel is stored as ``(kh, kw, 1, C)``, the layout of ``flax.linen.Conv(feature_group_count=C)``,
so weights convert between the two and from Keras/PyTorch without reshuffling.
"""

from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from medjax.models import native

PaddingLike = str | int | Sequence[tuple[int, int]]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def resolve_padding(
    padding: PaddingLike, kernel_size: tuple[int, int], dilation: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit ((top, bottom), (left, right)) padding.

    ``'SAME'`` here means *symmetric* same padding (PyTorch style, ``(k - 1) * d // 2`` per side), which
    is what ConvNeXt, MobileNetV2 (torchvision) and MedNeXt use; TensorFlow's asymmetric padding must be
    given explicitly, e.g. ``((0, 1), (0, 1))``. ``'VALID'`` means no padding; an int pads all sides.
    """
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return ((0, 0), (0, 0))
        if padding.upper() == "SAME":
            return tuple(((k - 1) * d // 2,) * 2 for k, d in zip(kernel_size, dilation, strict=True))
        raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple(tuple(p) for p in padding)


def depthwise_conv2d_xla(x, kernel, *, strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), bias=None):
    """Reference depthwise convolution through ``lax.conv_general_dilated``.

    Args:
      x: ``(N, H, W, C)`` input.
      kernel: ``(kh, kw, 1, C)`` filters.
      strides, padding, dilation: per spatial axis; padding explicit pairs.
      bias: ``(C,)``, added to every output, or None.
    Returns:
      ``(N, H', W', C)`` output.
    """
    y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )
    return y if bias is None else y + bias


# --- impl='fast' -------------------------------------------------------------------------------------------
# XLA CPU emits a fast vectorised loop for an elementwise fusion of many strided slices, but slow code for
# grouped convolutions and for reductions. So the forward and the input gradient are sums of kh*kw shifted
# slices times a per-channel weight (one fusion each). The kernel gradient is a reduction over (N, H', W')
# per tap; measured on 32x56x56x96, k7 (2 cores): one XLA reduction per tap 830 ms (49 passes over memory),
# one stacked reduction 2.5-10 s, a scan over images 720 ms, a blocked batched matmul 840 ms, and the
# elementwise accumulation below, looped over (image, output row) on cache-resident rows, 350-460 ms; with
# one accumulator per tap instead of a stacked one, 45 ms (quiet machine, tcmalloc; 194 ms stacked).

Pairs = tuple[tuple[int, int], tuple[int, int]]


def _out_len(size: int, k: int, stride: int, dil: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - (k - 1) * dil - 1) // stride + 1


def _acc_dtype(dtype) -> jnp.dtype:
    """Accumulate low-precision inputs in float32 (kh*kw-term sums lose too much in bfloat16)."""
    return jnp.promote_types(dtype, jnp.float32)


def _tap(xp: jax.Array, i: int, j: int, out_hw: tuple[int, int], strides, dilation) -> jax.Array:
    """The input window read by kernel tap (i, j): ``xp[:, i*d + s*oh, j*d + s*ow, :]``."""
    (sh, sw), (dh, dw) = strides, dilation
    n, c = xp.shape[0], xp.shape[-1]
    start = (0, i * dh, j * dw, 0)
    limit = (n, i * dh + (out_hw[0] - 1) * sh + 1, j * dw + (out_hw[1] - 1) * sw + 1, c)
    return lax.slice(xp, start, limit, (1, sh, sw, 1))


def _shifted_sum(xp: jax.Array, kernel: jax.Array, out_hw: tuple[int, int], strides, dilation) -> jax.Array:
    """``sum_ij tap(xp, i, j) * kernel[i, j, 0]``: a depthwise correlation of an already padded input."""
    acc_dtype = _acc_dtype(xp.dtype)
    kernel = kernel.astype(acc_dtype)
    out = None
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            term = _tap(xp, i, j, out_hw, strides, dilation).astype(acc_dtype) * kernel[i, j, 0]
            out = term if out is None else out + term
    return out.astype(xp.dtype)


def _pad(x: jax.Array, padding: Pairs, interior: tuple[int, int] = (0, 0)) -> jax.Array:
    zero = jnp.zeros((), x.dtype)
    return lax.pad(x, zero, ((0, 0, 0), (*padding[0], interior[0]), (*padding[1], interior[1]), (0, 0, 0)))


def _forward(
    x: jax.Array, kernel: jax.Array, strides, padding: Pairs, dilation, input_dilation=(1, 1), bias=None
):
    """The depthwise correlation of ``x``, dilated by ``input_dilation`` (zeros between its elements: the
    input gradient of a strided convolution) and padded by ``padding`` (pairs; negative ones crop), plus
    ``bias`` (``(C,)``) if given."""
    xp = _pad(x, padding, interior=(input_dilation[0] - 1, input_dilation[1] - 1))
    out_hw = tuple(
        _out_len(xp.shape[1 + a], kernel.shape[a], strides[a], dilation[a], (0, 0)) for a in (0, 1)
    )
    out = _shifted_sum(xp, kernel, out_hw, strides, dilation)
    return out if bias is None else out + bias.astype(out.dtype)


def _forward_native(x, kernel, strides, padding: Pairs, dilation, input_dilation=(1, 1), bias=None):
    """:func:`_forward` by medjax's native kernel (:mod:`medjax.models.native`), which skips the taps that
    fall in the padding or between dilated elements instead of reading a padded copy, and starts its sums
    at the bias instead of adding it in a pass of its own. It accumulates in float32 (as ``_forward`` does
    for lower precisions), so float64 inputs, and the geometries the kernel does not take (cropping; see
    ``native.forward_supports``), take ``_forward``."""
    if _acc_dtype(x.dtype) != jnp.float32 or not native.forward_supports(
        kernel.shape, strides, padding, input_dilation
    ):
        return _forward(x, kernel, strides, padding, dilation, input_dilation, bias)
    y = native.depthwise_forward(x, kernel, strides, padding, dilation, input_dilation, bias=bias)
    return y.astype(x.dtype)


def _grad_input(g, kernel, in_hw: tuple[int, int], strides, padding, dilation, correlate):
    """dL/dx: the cotangent, dilated by the stride, correlated with the flipped kernel (by ``correlate``,
    the forward pass's function).

    The edge padding is chosen so the stride-1 correlation lands exactly on the unpadded input grid;
    it is negative (cropping) when the forward padding exceeds the dilated kernel extent.
    """
    edges = []
    for a in (0, 1):
        lo = (kernel.shape[a] - 1) * dilation[a] - padding[a][0]
        edges.append((lo, in_hw[a] + padding[a][0] - ((g.shape[1 + a] - 1) * strides[a] + 1)))
    return correlate(g, kernel[::-1, ::-1], (1, 1), tuple(edges), dilation, strides)


def _grad_kernel(x: jax.Array, g: jax.Array, kernel_shape, strides, padding, dilation, with_bias=False):
    """``(dL/dkernel, dL/dbias or None)``: dL/dkernel[i, j, c] = sum over (n, oh, ow) of tap(x, i, j) * g,
    accumulated one output row at a time; with ``with_bias``, the bias's, ``g`` summed per channel.

    Each loop step multiplies the kh input rows of one output row by that cotangent row and adds each tap's
    product into its own (W', C) accumulator; the W' axis is summed once after the loop. One accumulator
    per tap (a tuple carry) lets XLA update each in place: stacking them into one (kh*kw, W', C) array
    costs a concatenate and an add per step and was 2-4x slower (measured).
    """
    (kh, kw), (sh, _) = kernel_shape[:2], strides
    n, ho, wo, c = g.shape
    acc_dtype = _acc_dtype(g.dtype)
    xp = _pad(x, padding)
    rows = (kh - 1) * dilation[0] + 1

    # Nested image/row loops, not one flat loop: the flat index's divide and remainder were separate
    # thunks per row, 10-20 % of a 3x3 layer's kernel gradient.
    def image(img, acc):
        x_img = lax.dynamic_index_in_dim(xp, img, keepdims=True).astype(acc_dtype)
        g_img = lax.dynamic_index_in_dim(g, img, keepdims=True).astype(acc_dtype)

        def row_step(row, acc):
            xs = lax.dynamic_slice(x_img, (0, row * sh, 0, 0), (1, rows, xp.shape[2], c))
            gs = lax.dynamic_slice(g_img, (0, row, 0, 0), (1, 1, wo, c))
            taps = [_tap(xs, i, j, (1, wo), strides, dilation) for i in range(kh) for j in range(kw)]
            return tuple(a + (t * gs)[0, 0] for a, t in zip(acc, taps, strict=True))

        return lax.fori_loop(0, ho, row_step, acc)

    zeros = tuple(jnp.zeros((wo, c), acc_dtype) for _ in range(kh * kw))
    acc = lax.fori_loop(0, n, image, zeros)
    dk = jnp.stack([jnp.sum(a, axis=0) for a in acc]).reshape(kernel_shape)
    return dk, (jnp.sum(g.astype(acc_dtype), axis=(0, 1, 2)) if with_bias else None)


def _grad_kernel_native(
    x: jax.Array, g: jax.Array, kernel_shape, strides, padding, dilation, with_bias=False
):
    """The same gradients from medjax's native kernel (:mod:`medjax.models.native`): one pass over the input
    and cotangent with the accumulators in registers, the padding skipped rather than copied, the bias's
    sums taken from the cotangent rows it reads anyway. It accumulates in float32, so float64 inputs take
    the loop."""
    if _acc_dtype(g.dtype) != jnp.float32:
        return _grad_kernel(x, g, kernel_shape, strides, padding, dilation, with_bias)
    crops = tuple((min(lo, 0), min(hi, 0)) for lo, hi in padding)  # Negative padding crops: done here.
    pads = tuple((max(lo, 0), max(hi, 0)) for lo, hi in padding)
    args = (_pad(x, crops), g, kernel_shape, strides, pads, dilation)
    if with_bias:
        return native.depthwise_kernel_and_bias_grad(*args)
    return native.depthwise_kernel_grad(*args), None


class _Kernels(NamedTuple):
    """The two computations behind a depthwise convolution with a hand-written VJP."""

    # (x, kernel, strides, padding, dilation, input_dilation, bias) -> y: the forward pass and input gradient.
    correlate: Callable
    # (x, g, kernel_shape, strides, padding, dilation, with_bias) -> (dL/dkernel, dL/dbias or None).
    kernel_grad: Callable


_LOOP = _Kernels(_forward, _grad_kernel)
_NATIVE = _Kernels(_forward_native, _grad_kernel_native)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _depthwise_fast(x, kernel, bias, strides, padding, dilation, kernels):
    return kernels.correlate(x, kernel, strides, padding, dilation, bias=bias)


def _depthwise_fast_fwd(x, kernel, bias, strides, padding, dilation, kernels):
    return kernels.correlate(x, kernel, strides, padding, dilation, bias=bias), (x, kernel, bias)


def _depthwise_fast_bwd(strides, padding, dilation, kernels, residuals, g):
    x, kernel, bias = residuals
    dx = _grad_input(g, kernel, x.shape[1:3], strides, padding, dilation, kernels.correlate)
    dk, db = kernels.kernel_grad(x, g, kernel.shape, strides, padding, dilation, bias is not None)
    return dx.astype(x.dtype), dk.astype(kernel.dtype), None if bias is None else db.astype(bias.dtype)


_depthwise_fast.defvjp(_depthwise_fast_fwd, _depthwise_fast_bwd)


def _shifted(x, kernel, strides, padding, dilation, kernels: _Kernels, bias=None):
    strides, dilation = _pair(strides), _pair(dilation)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _depthwise_fast(x, kernel, bias, strides, padding, dilation, kernels)


def depthwise_conv2d_loop(x, kernel, *, strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), bias=None):
    """Depthwise convolution as shifted multiply-adds with a hand-written VJP, its kernel gradient the
    pure-XLA row loop; same contract as the reference.

    Forward and input gradient cost one fused pass each; outputs and gradients match ``depthwise_conv2d_xla``
    to float rounding (tests/test_depthwise.py), forward+backward 5-19x faster on CPU
    (launch/bench_depthwise.py). bfloat16 inputs are accumulated in float32.
    """
    return _shifted(x, kernel, strides, padding, dilation, _LOOP, bias)


def depthwise_conv2d_native(
    x, kernel, *, strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), bias=None
):
    """Depthwise convolution by medjax's native kernels (built with the system's C++ compiler,
    :mod:`medjax.models.native`): the forward pass (its sums starting at the bias), the input gradient (the
    same kernel on the cotangent) and the kernel's and bias's gradients; same contract as the reference."""
    return _shifted(x, kernel, strides, padding, dilation, _NATIVE, bias)


def depthwise_conv2d_fast(x, kernel, **kwargs):
    """The fastest available: ``depthwise_conv2d_native`` when its kernel builds (and ``MEDJAX_NATIVE`` is
    not 0), else ``depthwise_conv2d_loop``."""
    return (depthwise_conv2d_native if native.available() else depthwise_conv2d_loop)(x, kernel, **kwargs)


IMPLEMENTATIONS = {
    "xla": depthwise_conv2d_xla,
    "fast": depthwise_conv2d_fast,
    "loop": depthwise_conv2d_loop,
    "native": depthwise_conv2d_native,
}


class Geometry(NamedTuple):
    """A depthwise convolution's arguments other than input and kernel (:func:`depthwise_conv2d`'s)."""

    strides: tuple[int, int]
    padding: Pairs
    dilation: tuple[int, int]
    impl: str


def native_input_grad(
    g, kernel, in_hw: tuple[int, int], strides, padding, batch_norm
) -> tuple[jax.Array, ...]:
    """``(dL/dx, sum(gm), sum(gm * x_bn))`` of an undilated depthwise convolution whose input was a clamped
    training BatchNorm's output: the input gradient by the native forward kernel on the cotangent, and the
    BatchNorm's backward sums (:func:`native.clamped_channel_sums`) of it, ``gm`` it where the BatchNorm's
    output lay inside the clamp, taken as it writes each row (:func:`native.depthwise_forward_clamped_sums`).
    ``batch_norm`` is ``(x_bn, mean, mul, bias, (lo, hi))``. For fused operations that own their VJP."""
    x_bn, mean, mul, bias, (lo, hi) = batch_norm

    def correlate(g, kernel, strides, padding, dilation, input_dilation):
        if native.forward_supports(kernel.shape, strides, padding, input_dilation):
            return native.depthwise_forward_clamped_sums(
                g, kernel, padding, input_dilation, x_bn, mean, mul, bias, lo, hi
            )
        y = _forward_native(g, kernel, strides, padding, dilation, input_dilation)  # cropping: XLA's
        return (y, *native.clamped_channel_sums(y, x_bn, mean, mul, bias, lo, hi))

    return _grad_input(g, kernel, in_hw, strides, padding, (1, 1), correlate)


def depthwise_conv2d(
    x, kernel, *, strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), impl="fast", bias=None
):
    """Depthwise convolution dispatching to ``impl`` (a key of ``IMPLEMENTATIONS``), plus ``bias`` (``(C,)``)
    if given: the native kernels add it inside their passes."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"depthwise_impl must be one of {sorted(IMPLEMENTATIONS)}, got {impl!r}")
    return IMPLEMENTATIONS[impl](x, kernel, strides=strides, padding=padding, dilation=dilation, bias=bias)


class DepthwiseConv(nn.Module):
    """Depthwise convolution layer (one filter per channel), parameters named like ``nn.Conv``.

    Attributes:
      kernel_size: int or (kh, kw).
      strides: int or pair.
      padding: see :func:`resolve_padding` (default symmetric 'SAME').
      dilation: int or pair.
      use_bias: add a per-channel bias.
      impl: 'fast' (default) or 'xla' (the reference; ``config.model.depthwise_impl``).
    """

    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    dilation: int | Sequence[int] = 1
    use_bias: bool = True
    impl: str = "fast"
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, fused_input: Callable | None = None):
        """The convolution of ``x``; with ``fused_input``, of a transform of ``x`` that ``fused_input``
        computes jointly with the convolution: ``fused_input(x, kernel, geometry) -> (y, aux)``
        (``geometry`` a :class:`Geometry`), and the call returns ``(y, aux)``.
        :class:`medjax.models.layers.BatchNorm` passes one (its ``then=``) so that its normalized map is
        never written out whole."""
        ks, st, dl = _pair(self.kernel_size), _pair(self.strides), _pair(self.dilation)
        channels = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (*ks, 1, channels), jnp.float32)
        dtype = self.dtype or x.dtype
        bias = (
            self.param("bias", self.bias_init, (channels,), jnp.float32).astype(dtype)
            if self.use_bias
            else None
        )
        geometry = Geometry(st, resolve_padding(self.padding, ks, dl), dl, self.impl)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if fused_input is None:
            return depthwise_conv2d(x, kernel, bias=bias, **geometry._asdict())
        y, aux = fused_input(x, kernel, geometry)
        return (y if bias is None else y + bias), aux
