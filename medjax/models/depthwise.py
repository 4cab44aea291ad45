"""Depthwise 2-D convolution for XLA CPU.

XLA's grouped convolution (``feature_group_count=C``) is pathologically slow on CPU (DESIGN.md §4), and
every medjax architecture is built on depthwise convolutions. ``impl='xla'`` is the reference path;
``impl='fast'`` is the path models use by default.

The kernel is stored as ``(kh, kw, 1, C)``, the layout of ``flax.linen.Conv(feature_group_count=C)``,
so weights convert between the two and from Keras/PyTorch without reshuffling.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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


def depthwise_conv2d_xla(x, kernel, *, strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1)):
    """Reference depthwise convolution through ``lax.conv_general_dilated``.

    Args:
      x: ``(N, H, W, C)`` input.
      kernel: ``(kh, kw, 1, C)`` filters.
      strides, padding, dilation: per spatial axis; padding explicit pairs.
    Returns:
      ``(N, H', W', C)`` output.
    """
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


IMPLEMENTATIONS = {"xla": depthwise_conv2d_xla}


def depthwise_conv2d(x, kernel, *, strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), impl="fast"):
    """Depthwise convolution dispatching to ``impl`` (a key of ``IMPLEMENTATIONS``)."""
    impl = "xla" if impl == "fast" and "fast" not in IMPLEMENTATIONS else impl
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"depthwise_impl must be one of {sorted(IMPLEMENTATIONS)}, got {impl!r}")
    return IMPLEMENTATIONS[impl](x, kernel, strides=strides, padding=padding, dilation=dilation)


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
    def __call__(self, x: jax.Array) -> jax.Array:
        ks, st, dl = _pair(self.kernel_size), _pair(self.strides), _pair(self.dilation)
        channels = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (*ks, 1, channels), jnp.float32)
        dtype = self.dtype or x.dtype
        y = depthwise_conv2d(
            x.astype(dtype),
            kernel.astype(dtype),
            strides=st,
            padding=resolve_padding(self.padding, ks, dl),
            dilation=dl,
            impl=self.impl,
        )
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (channels,), jnp.float32).astype(dtype)
        return y
