"""Building blocks shared by the medjax architectures.

Everything here is channels-last (NHWC). The depthwise convolution lives in :mod:`depthwise` and is
re-exported here so model files import their blocks from one place.
"""

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from medjax.models.depthwise import DepthwiseConv

__all__ = ["Dense", "DepthwiseConv", "DropPath", "GlobalPool", "PointwiseConv", "SEVector", "gelu"]


def _matmul_last_axis(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x[..., K] @ kernel[K, F]`` as one 2-D matrix product over all leading axes.

    XLA CPU runs the (N*H*W, K) x (K, F) product and its two gradients at matmul speed, but the same
    contraction written on a 4-D array (``nn.Dense``'s ``dot_general``, or a 1x1 ``conv_general_dilated``)
    gets a weight gradient several times slower. Measured fwd+bwd, 32x112x112x16 -> 96 (issue 6 closing
    note): 1x1 conv 356 ms, 4-D dot_general 297 ms, 2-D matmul 61 ms.
    """
    lead = x.shape[:-1]
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*lead, kernel.shape[-1])


class Dense(nn.Dense):
    """``nn.Dense`` with the same parameters, computed as one 2-D matrix product (:func:`_matmul_last_axis`).

    For the per-pixel MLPs of ConvNeXt and MedNeXt, applied to (N, H, W, C) maps.
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:
        lead = inputs.shape[:-1]
        return super().__call__(inputs.reshape(-1, inputs.shape[-1])).reshape(*lead, self.features)


class PointwiseConv(nn.Module):
    """1x1 convolution with ``nn.Conv``'s parameters (kernel ``(1, 1, in, out)``), computed as one matmul.

    Parameter names and shapes equal ``nn.Conv(features, (1, 1))``'s, so Keras and PyTorch weights convert
    unchanged; only the arithmetic is laid out for XLA CPU (:func:`_matmul_last_axis`).
    """

    features: int
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
        y = _matmul_last_axis(x, kernel[0, 0].astype(x.dtype))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(x.dtype)
        return y


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, ``x * Phi(x)``: the values of ``nn.gelu(x, approximate=False)``, cheaper to train.

    Differentiating ``nn.gelu`` keeps its erfc and exp intermediates as full-size residuals: on XLA CPU
    each is its own pass over the 4x-expanded MLP activations. The JVP here computes the derivative
    ``Phi(x) + x * phi(x)`` in one fusion, so one tensor is saved and read back (issue 6 closing note).
    """
    return 0.5 * x * lax.erfc(-x * _INV_SQRT2)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    cdf = 0.5 * lax.erfc(-x * _INV_SQRT2)
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)
    return x * cdf, dx * (cdf + x * pdf)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per example with probability ``rate``.

    Survivors are scaled by ``1 / (1 - rate)`` so the expected value is unchanged (timm's ``drop_path``).
    Uses the ``'dropout'`` RNG stream.
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class GlobalPool(nn.Module):
    """Global pooling of an NHWC map to a vector.

    Attributes:
      mode: 'avg' (the canonical head), 'max', or 'avg+max' (study A's dual pooling).
      fusion: how 'avg+max' fuses the two vectors: 'concat' (2C features, study A default in PAPERS.md)
        or 'sum' (C features, for ablation).
    """

    mode: str = "avg"
    fusion: str = "concat"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        avg = jnp.mean(x, axis=(1, 2))
        if self.mode == "avg":
            return avg
        mx = jnp.max(x, axis=(1, 2))
        if self.mode == "max":
            return mx
        if self.mode != "avg+max":
            raise ValueError(f"pooling must be 'avg', 'max' or 'avg+max', got {self.mode!r}")
        if self.fusion == "concat":
            return jnp.concatenate([avg, mx], axis=-1)
        if self.fusion == "sum":
            return avg + mx
        raise ValueError(f"fusion must be 'concat' or 'sum', got {self.fusion!r}")


class SEVector(nn.Module):
    """Squeeze-and-excitation on a pooled feature vector (study A's SEVector).

    ``v * sigmoid(W2 relu(W1 v))`` with hidden width ``max(1, C // ratio)``. The vector is already
    "squeezed" (it is the pooled feature), so unlike a classic SE block there is no spatial pooling.
    The gate's bias starts at zero, i.e. every channel starts half-open.
    """

    ratio: int = 16
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, v: jax.Array) -> jax.Array:
        channels = v.shape[-1]
        h = self.activation(nn.Dense(max(1, channels // self.ratio), name="reduce")(v))
        gate = nn.sigmoid(nn.Dense(channels, name="expand")(h))
        return v * gate
