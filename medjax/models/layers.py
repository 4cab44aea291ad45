"""Building blocks shared by the medjax architectures.

Everything here is channels-last (NHWC). The depthwise convolution lives in :mod:`depthwise` and is
re-exported here so model files import their blocks from one place.
"""

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import lift
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from medjax.models import native
from medjax.models.depthwise import DepthwiseConv, Geometry, depthwise_conv2d, native_input_grad

__all__ = [
    "BatchNorm",
    "Conv",
    "ConvTranspose",
    "Dense",
    "DepthwiseConv",
    "DropPath",
    "GlobalPool",
    "LayerNorm",
    "SEVector",
    "batch_norm",
    "gelu",
    "matmul",
    "remat",
]

# What a matrix product's output is named for ``jax.checkpoint`` policies: the native path is a custom call,
# which ``dots_with_no_batch_dims_saveable`` would not recognise as a product worth keeping.
MATMUL_NAME = "matmul_output"


# ``train.remat``: what a rematerialised block keeps from its forward pass for the backward pass. The
# block's input is always kept; 'block' recomputes everything inside it (least memory, one more forward
# pass of the block per step), 'block_save_matmuls' keeps the matrix products' outputs and recomputes the
# cheap element-wise work between them (norms, activations, depthwise convolutions' outputs).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "block_save_matmuls": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(MATMUL_NAME),
    ),
}


def _after(tree, cotangent):
    """``tree`` with each floating-point leaf made to depend on ``cotangent`` (it adds ``0 * c``, ``c``
    one element of the cotangent: exact for a finite cotangent, NaN for a NaN one, whose gradient is NaN
    anyway).

    ``jax.checkpoint`` alone does not bound memory on XLA CPU: its recomputation depends only on the
    block's saved input, and the optimization barrier that is meant to keep it in the backward pass is
    removed before XLA CPU schedules, so the scheduler runs the recomputation right after the forward
    pass's own copy and both stay live until the backward pass (ConvNeXt-Tiny at 224/batch 32: XLA
    plans 8.3 GB with ``jax.checkpoint`` alone, 8.6 GB without, 2.75 GB with this tie). A data dependency
    on the cotangent is the one ordering XLA cannot move.
    """
    anchor = jnp.ravel(jax.tree.leaves(cotangent)[0])[0] * 0
    return jax.tree.map(
        lambda x: x + anchor.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _checkpoint_in_backward(fn: Callable, policy: Callable) -> Callable:
    """Lifted transform of a scope function ``fn(scope, x, train)``: ``jax.checkpoint`` under
    ``policy``, its recomputation scheduled in the backward pass (:func:`_after`).

    A custom VJP whose forward pass is the checkpointed block's ``vjp`` (so it keeps what ``policy``
    saves, with the same random numbers and BatchNorm updates as without rematerialisation) and whose
    backward pass hands those residuals, tied to the output's cotangent, to that ``vjp``.
    """
    checkpointed = lift.checkpoint(fn, policy=policy, static_argnums=(1,))

    def forward(scope, x, train):
        return lift.vjp(lambda s, x: checkpointed(s, x, train), scope, x)

    def backward(train, pullback, cotangent):
        del train
        return _after(pullback, cotangent)(cotangent)

    # jax.custom_vjp counts the variables first: ``train`` is argument 2.
    return lift.custom_vjp(checkpointed, forward, backward, nondiff_argnums=(2,))


def remat(block: type[nn.Module], policy: str) -> type[nn.Module]:
    """``block`` rematerialised under ``policy`` (a :data:`REMAT_POLICIES` key), or itself for 'none'.

    The block is called as ``block(...)(x, train)`` with ``train`` a positional Python bool (static inside
    ``jax.checkpoint``). Parameter names and shapes are unchanged as long as the caller names the block
    (``name=``), so checkpoints load with or without rematerialisation.
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {policy!r}")
    if policy == "none":
        return block
    return nn.transforms.lift_transform(_checkpoint_in_backward, block, policy=REMAT_POLICIES[policy])


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` for 2-D ``a (m, k)`` and ``b (k, n)`` through oneMKL's sgemm, the value and both gradients.

    On an Intel Xeon XLA CPU's dot took 1.1-1.4x oneMKL's time on a ConvNeXt-Tiny block's six MLP products
    (one side 96-768 wide, the other up to 100,352 rows), up to 1.85x on a weight gradient
    (:func:`native.matmul`); on an AMD EPYC it was the faster. Float32 only, and only where
    :func:`native.matmul_preferred` says so (oneMKL found, an Intel CPU or ``MEDJAX_MKL=1``, native kernels
    allowed: not within :func:`native.xla_only`, which export uses); otherwise XLA computes all three.
    The gradients have no gradients of their own on the native path: for second-order differentiation set
    ``MEDJAX_MKL=0``.
    """
    return checkpoint_name(_matmul(a, b, _native_product(a, b)), MATMUL_NAME)


def _native_float32(*arrays: jax.Array) -> bool:
    """Whether the native kernels are built and every one of ``arrays`` is float32, which is all they take."""
    return all(x.dtype == jnp.float32 for x in arrays) and native.available()


def _native_product(*arrays: jax.Array) -> bool:
    return _native_float32(*arrays) and native.matmul_preferred()


def _product(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool, native_path: bool):
    if native_path:
        return native.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    return (a.T if transpose_a else a) @ (b.T if transpose_b else b)


# ``native_value`` is decided by the caller when it is traced and passed as a static argument, so that a
# trace under native.xla_only() never reuses a native one.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(a: jax.Array, b: jax.Array, native_value: bool) -> jax.Array:
    return native.matmul(a, b) if native_value else a @ b


def _matmul_fwd(a, b, native_value):
    return _product(a, b, False, False, native_value), (a, b)


def _matmul_bwd(native_value, residuals, g):
    a, b = residuals
    da = _product(g, b, False, True, native_value)  # g is float32 too: a cotangent has its primal's dtype.
    return da.astype(a.dtype), _product(a, g, True, False, native_value).astype(b.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _matmul_last_axis(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x[..., K] @ kernel[K, F]`` as one 2-D matrix product over all leading axes (:func:`matmul`).

    XLA CPU runs the (N*H*W, K) x (K, F) product and its two gradients at matmul speed, but the same
    contraction written on a 4-D array (``nn.Dense``'s ``dot_general``, or a 1x1 ``conv_general_dilated``)
    gets a weight gradient several times slower. Measured fwd+bwd, 32x112x112x16 -> 96: 1x1 conv 356 ms,
    4-D dot_general 297 ms, 2-D matmul 61 ms.
    """
    lead = x.shape[:-1]
    return matmul(x.reshape(-1, x.shape[-1]), kernel).reshape(*lead, kernel.shape[-1])


class Dense(nn.Dense):
    """``nn.Dense`` with the same parameters, computed as one 2-D matrix product (:func:`matmul`).

    For the per-pixel MLPs of ConvNeXt and MedNeXt, applied to (N, H, W, C) maps. ``activation='gelu'``
    returns ``gelu(x @ kernel + bias)`` with the bias added inside :func:`gelu`'s pass. ``defer_bias``
    returns ``(x @ kernel, bias)`` for the caller to add the bias where XLA fuses it with what follows:
    ConvNeXt's layer scale ``gamma * (p + bias)`` differentiated keeps ``p + bias`` for ``gamma``'s gradient,
    a map XLA writes in a pass of its own, where ``gamma * p + gamma * bias`` keeps the product ``p`` that
    exists anyway. A ``precision`` other than the default computes with XLA's dot.
    """

    activation: str | None = None
    defer_bias: bool = False

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array | None]:
        if self.activation not in (None, "gelu") or (self.activation == "gelu" and not self.use_bias):
            raise ValueError(
                f"Dense: activation must be None, or 'gelu' with use_bias; got {self.activation!r}."
            )
        if self.defer_bias and self.activation is not None:
            raise ValueError(
                "Dense: defer_bias returns the product before the bias, so it takes no activation."
            )
        lead = inputs.shape[:-1]
        rows = inputs.reshape(-1, inputs.shape[-1])
        kernel = self.param("kernel", self.kernel_init, (rows.shape[-1], self.features), self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        )
        rows, kernel, bias = nn.dtypes.promote_dtype(rows, kernel, bias, dtype=self.dtype)
        if self.precision is None:
            out = matmul(rows, kernel)
        else:
            out = jnp.matmul(rows, kernel, precision=self.precision)
        if self.defer_bias:
            return out.reshape(*lead, self.features), bias
        if self.activation == "gelu":
            out = gelu(out, bias)
        elif bias is not None:
            out = out + bias
        return out.reshape(*lead, self.features)


def _patches(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
    """``(N, H, W, C)`` (already padded) -> ``(N, H', W', kh*kw*C)``: each output pixel's receptive field,
    ordered (row, column, channel) like a flattened ``(kh, kw, C, F)`` kernel.

    When the kernel tiles the image (kernel = stride: patchify stems, ConvNeXt/MedNeXt downsampling) this
    is a reshape and a transpose; otherwise the native kernel (:func:`native.patches`) where it runs, else
    one strided slice per tap, concatenated.
    """
    (kh, kw), (sh, sw) = kernel_size, strides
    if (kh, kw) != (sh, sw) and _native_float32(x):
        return _native_patches(x, tuple(kernel_size), tuple(strides), x.shape)
    return _patches_xla(x, kernel_size, strides)


def _patches_xla(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
    (kh, kw), (sh, sw) = kernel_size, strides
    n, h, w, c = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    if (kh, kw) == (sh, sw):
        if (kh, kw) == (1, 1):
            return x
        x = x[:, : ho * sh, : wo * sw].reshape(n, ho, sh, wo, sw, c)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, ho, wo, kh * kw * c)
    rows, cols = (ho - 1) * sh + 1, (wo - 1) * sw + 1
    taps = [x[:, i : i + rows : sh, j : j + cols : sw] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(taps, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _native_patches(x, kernel_size, strides, shape):
    """:func:`native.patches`, differentiated as XLA's :func:`_patches_xla` (the patches are linear in
    ``x``: the input gradient is their transpose; ``shape`` is ``x``'s, which the transpose needs). The
    native kernel is the forward only: MobileNetV2's stem, where it saves most, reads the image, which
    needs no gradient."""
    return native.patches(x, kernel_size, strides)


def _native_patches_fwd(x, kernel_size, strides, shape):
    return native.patches(x, kernel_size, strides), None


def _native_patches_bwd(kernel_size, strides, shape, _, g):
    transpose = jax.linear_transpose(
        lambda v: _patches_xla(v, kernel_size, strides), jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    return transpose(g)


_native_patches.defvjp(_native_patches_fwd, _native_patches_bwd)


class Conv(nn.Module):
    """Dense 2-D convolution with ``nn.Conv``'s parameters, computed as patches times one 2-D matrix.

    Parameter names, shapes and default initialisers equal ``nn.Conv``'s (kernel ``(kh, kw, in, out)``,
    bias ``(out,)``), so Keras and PyTorch weights and older checkpoints load unchanged; only the arithmetic
    is laid out for XLA CPU: :func:`_patches` then :func:`_matmul_last_axis`. XLA CPU's own convolution is
    2-3x slower to train for the layers medjax has (its kernel gradient most of all). Measured fwd+bwd at
    batch 32, XLA conv vs this (ms): MobileNetV2's 3x3/2 stem 140 vs 65,
    ConvNeXt-Tiny's 4x4/4 stem 100 vs 46 and 2x2/2 downsampling 56->28 192 vs 111.

    Attributes:
      features: output channels.
      kernel_size: ``(kh, kw)``.
      strides: an int or a pair.
      padding: ``'SAME'``, ``'VALID'`` or ``((top, bottom), (left, right))``, as in ``nn.Conv``.
      impl: ``'xla'`` computes with ``lax.conv_general_dilated`` (the reference, and what ONNX export
        traces); any other value, the patches. Models pass their ``depthwise_impl``.
    """

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: int | tuple[int, int] = 1
    padding: str | tuple[tuple[int, int], tuple[int, int]] = "SAME"
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    impl: str = "fast"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        strides = (self.strides, self.strides) if isinstance(self.strides, int) else tuple(self.strides)
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32)
        pads = self.padding
        if isinstance(pads, str):
            pads = lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, pads)
        if self.impl == "xla":
            dims = ("NHWC", "HWIO", "NHWC")
            y = lax.conv_general_dilated(x, kernel.astype(x.dtype), strides, pads, dimension_numbers=dims)
        else:
            if any(p != (0, 0) for p in map(tuple, pads)):
                x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
            y = _matmul_last_axis(
                _patches(x, (kh, kw), strides), kernel.reshape(-1, self.features).astype(x.dtype)
            )
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(x.dtype)
        return y


class ConvTranspose(nn.Module):
    """Transposed convolution whose kernel equals its stride (non-overlapping 2x, 4x upsampling), with
    ``nn.ConvTranspose``'s parameters and values (``padding='VALID'``, ``transpose_kernel=False``).

    Every input pixel writes its own ``s x s`` output tile, so the layer is one 2-D matrix product
    ``(N*H*W, C) x (C, s*s*F)`` followed by a depth-to-space reshape, instead of XLA's transposed
    convolution (a convolution over a zero-dilated input, s*s times the work). Segmentation decoders use it
    to upsample by 2 between levels and by 4 to full resolution.

    Attributes:
      features: output channels.
      stride: upsampling factor (also the kernel size).
      impl: ``'xla'`` computes with ``lax.conv_transpose`` (the reference); any other value, the product.
    """

    features: int
    stride: int = 2
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    impl: str = "fast"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s, channels = self.stride, x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (s, s, channels, self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(x.dtype)
        kernel = kernel.astype(x.dtype)
        if self.impl == "xla":
            dims = ("NHWC", "HWIO", "NHWC")
            return lax.conv_transpose(x, kernel, (s, s), "VALID", dimension_numbers=dims) + bias
        # lax.conv_transpose without transpose_kernel correlates with the unflipped kernel over the
        # dilated input, so output offset (a, b) inside a tile reads kernel tap (s-1-a, s-1-b).
        weights = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(channels, s * s * self.features)
        n, h, w, _ = x.shape
        y = _matmul_last_axis(x, weights).reshape(n, h, w, s, s, self.features)
        return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * s, w * s, self.features) + bias


# BatchNorm's optional activation: (lower, upper) bounds of its clamp, and the function itself for evaluation.
_BN_ACTIVATIONS: dict[str, tuple[float, float, Callable[[jax.Array], jax.Array]]] = {
    "relu": (0.0, math.inf, jax.nn.relu),
    "relu6": (0.0, 6.0, jax.nn.relu6),
}


class BatchNorm(nn.Module):
    """``nn.BatchNorm`` over the last axis (same variables, statistics and running averages) whose training
    pass has a hand-written backward, optionally followed by its activation (``activation``).

    Differentiating ``nn.BatchNorm`` through its mean and variance leaves XLA three reductions and a
    materialised ``x - mean`` per layer; the backward here is the closed form, two reductions
    (``sum(g)``, ``sum(g * x)``, from which ``sum(g * x_hat)`` follows) and one elementwise pass. BatchNorm is
    most of MobileNetV2's memory traffic on CPU, so both its statistics and its backward reductions are
    one pass each with medjax's native kernel (:func:`native.channel_sums`).

    With ``activation`` ('relu' or 'relu6', as ``jax.nn``'s, with their gradients) the clamp belongs to the
    same backward: its mask is recomputed from the BatchNorm's input, inside the native sums
    (:func:`native.clamped_channel_sums`) and the fused ``dx`` pass, instead of XLA writing the masked
    cotangent in a pass of its own and reading it twice (in MobileNetV2's step those selects took about a
    tenth of the time), and the pre-activation map is no longer kept for the backward pass. Where the mask
    is recomputed, a value within rounding of a bound may fall on the other side than in the forward pass;
    the gradient there is a one-sided choice either way.

    Attributes:
      use_running_average: normalise with the stored averages (evaluation) instead of the batch's.
      momentum, epsilon: as ``nn.BatchNorm`` (running = momentum * running + (1 - momentum) * batch, with
        the batch's biased variance).
      activation: None, 'relu' or 'relu6', applied to the output.
    """

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    scale_init: nn.initializers.Initializer = nn.initializers.ones_init()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    activation: str | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, then: DepthwiseConv | None = None
    ) -> jax.Array:
        """The normalized (and activated) ``x``; with ``then``, that depthwise convolution of it, which in
        training is computed with the normalization inside the convolution's native kernels where they take
        it (:func:`_batch_norm_depthwise`): the normalized map is never written out whole nor kept for the
        backward pass, which recomputes it row by row from ``x``."""
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        if self.activation is not None and self.activation not in _BN_ACTIVATIONS:
            choices = sorted(_BN_ACTIVATIONS)
            raise ValueError(f"BatchNorm: activation must be None or in {choices}, got {self.activation!r}")
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", self.scale_init, features, jnp.float32)
        bias = self.param("bias", self.bias_init, features, jnp.float32)
        if use_running_average:
            shape = (1,) * (x.ndim - 1) + features
            mul = (lax.rsqrt(ra_var.value + self.epsilon) * scale).reshape(shape)
            y = ((x - ra_mean.value.reshape(shape)) * mul + bias.reshape(shape)).astype(x.dtype)
            y = y if self.activation is None else _BN_ACTIVATIONS[self.activation][2](y)
            return y if then is None else then(y)
        if then is None:
            y, mean, var = _batch_norm_train(x, scale, bias, self.epsilon, self.activation)
        else:
            fused = functools.partial(
                _batch_norm_depthwise,
                scale=scale,
                bias=bias,
                epsilon=self.epsilon,
                activation=self.activation,
            )
            y, (mean, var) = then(x, fused_input=fused)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * lax.stop_gradient(mean)
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * lax.stop_gradient(var)
        return y


def batch_norm(
    train: bool, activation: str | None = None, then: DepthwiseConv | None = None, **kwargs
) -> Callable[[jax.Array], jax.Array]:
    """A BatchNorm followed by ``activation`` (None, 'relu', 'relu6') and optionally by the depthwise
    convolution ``then``, as a model should build it: in training :class:`BatchNorm` with the activation
    inside its backward (and ``then`` fused with it); in evaluation ``nn.BatchNorm`` (the same variables) and
    then the activation and ``then``, which jax2onnx converts to one ONNX BatchNormalization (it rejects the
    traced form). Call it within a compact method; ``kwargs`` (``name``, ``momentum``, ``epsilon``) go to the
    BatchNorm."""
    if train:
        norm = BatchNorm(use_running_average=False, activation=activation, **kwargs)
        return functools.partial(norm, then=then)
    norm = nn.BatchNorm(use_running_average=True, **kwargs)
    steps = [norm, *([_BN_ACTIVATIONS[activation][2]] if activation else []), *([then] if then else [])]
    return functools.reduce(lambda f, g: lambda x: g(f(x)), steps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, activation):
    """``(y, mean, var)``: x normalised with its own per-channel statistics (float32), scaled, shifted and
    passed through ``activation``. Only ``y`` is differentiated; the statistics feed the running averages
    behind ``stop_gradient``."""
    return _batch_norm_train_fwd(x, scale, bias, epsilon, activation)[0]


def _channel_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum(a), sum(a * b))`` per channel in float32: one native pass when medjax's kernels are built,
    where XLA CPU would materialise the product and reduce twice (:func:`native.channel_sums`)."""
    if native.available():
        return native.channel_sums(a, b)
    axes = tuple(range(a.ndim - 1))
    return jnp.sum(a, axes), jnp.sum(a * b, axes)


def _batch_statistics(xf: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-channel ``(mean, var, rstd)`` of a float32 map, as ``nn.BatchNorm`` computes them in training."""
    count = math.prod(xf.shape[:-1])
    total, total_sq = _channel_sums(xf, xf)
    mean = total / count
    var = jnp.maximum(total_sq / count - mean * mean, 0.0)  # nn.BatchNorm's fast variance
    return mean, var, lax.rsqrt(var + epsilon)


def _batch_norm_train_fwd(x, scale, bias, epsilon, activation):
    xf = x.astype(jnp.float32)
    mean, var, rstd = _batch_statistics(xf, epsilon)
    y = (xf - mean) * (rstd * scale) + bias
    if activation is not None:
        lower, upper, _ = _BN_ACTIVATIONS[activation]
        y = jnp.clip(y, lower, upper)
    return (y.astype(x.dtype), mean, var), (x, mean, rstd, scale, bias)


def _batch_norm_train_bwd(epsilon, activation, residuals, cotangents):
    del epsilon
    return _batch_norm_backward(activation, residuals, cotangents[0])  # mean's and var's are zero


def _batch_norm_backward(activation, residuals, g, sums=None):
    """``(dx, dscale, dbias)`` of a training BatchNorm (and ``activation``) for its output's cotangent ``g``;
    ``sums``, when a caller already has them, are ``(sum(gm), sum(gm * x))`` with ``gm`` the activation's
    masked cotangent (or ``g``)."""
    x, mean, rstd, scale, bias = residuals
    g = g.astype(jnp.float32)
    count = math.prod(x.shape[:-1])
    xf = x.astype(jnp.float32)
    if activation is None:
        dbias, g_dot_x = _channel_sums(g, xf) if sums is None else sums
    else:
        lower, upper, _ = _BN_ACTIVATIONS[activation]
        mul = rstd * scale
        z = (xf - mean) * mul + bias  # the forward's expression, so the mask is the forward's
        masked = jnp.where((z > lower) & (z < upper), g, 0.0)
        if sums is not None:
            dbias, g_dot_x = sums
        elif native.available():  # the mask again inside the sums: only dx's fusion below reads ``masked``
            dbias, g_dot_x = native.clamped_channel_sums(g, xf, mean, mul, bias, lower, upper)
        else:
            dbias, g_dot_x = _channel_sums(masked, xf)
        g = masked
    dscale = rstd * (g_dot_x - mean * dbias)  # sum(g * x_hat), x_hat = (x - mean) * rstd
    x_hat = (xf - mean) * rstd
    dx = (scale * rstd) * (g - (dbias + x_hat * dscale) / count)
    return dx.astype(x.dtype), dscale, dbias


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def _batch_norm_depthwise(x, kernel, geometry: Geometry, *, scale, bias, epsilon, activation):
    """``(depthwise(act(BatchNorm(x))), (mean, var))`` in training, for :class:`BatchNorm`'s ``then``.

    With native kernels, float32 and an undilated kernel they take, the normalization and activation run
    inside the convolution's forward and kernel-gradient kernels
    (:func:`native.normalized_depthwise_forward`), which read the BatchNorm's input; the input gradient is
    the convolution's, then the BatchNorm's backward (:func:`_batch_norm_train_bwd`). The values and
    gradients equal the unfused ones. Otherwise the two run one after the other.
    """
    fusable = (
        geometry.impl in ("fast", "native")
        and _native_float32(x, kernel)
        and native.normalized_supports(kernel.shape, geometry.padding, geometry.dilation)
    )
    if not fusable:
        y, mean, var = _batch_norm_train(x, scale, bias, epsilon, activation)
        return depthwise_conv2d(y, kernel, **geometry._asdict()), (mean, var)
    y, mean, var = _batch_norm_depthwise_native(
        x, scale, bias, kernel, epsilon, activation, geometry.strides, geometry.padding
    )
    return y, (mean, var)


def _clamp_bounds(activation: str | None) -> tuple[float, float]:
    return (-math.inf, math.inf) if activation is None else _BN_ACTIVATIONS[activation][:2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _batch_norm_depthwise_native(x, scale, bias, kernel, epsilon, activation, strides, padding):
    return _batch_norm_depthwise_native_fwd(x, scale, bias, kernel, epsilon, activation, strides, padding)[0]


def _batch_norm_depthwise_native_fwd(x, scale, bias, kernel, epsilon, activation, strides, padding):
    mean, var, rstd = _batch_statistics(x, epsilon)
    y = native.normalized_depthwise_forward(
        x, mean, rstd * scale, bias, kernel, strides, padding, *_clamp_bounds(activation)
    )
    return (y, mean, var), (x, mean, rstd, scale, bias, kernel)


def _batch_norm_depthwise_native_bwd(epsilon, activation, strides, padding, residuals, cotangents):
    x, mean, rstd, scale, bias, kernel = residuals
    del epsilon
    g = cotangents[0]  # mean's and var's cotangents are zero (stop_gradient)
    mul, bounds = rstd * scale, _clamp_bounds(activation)
    dk = native.normalized_depthwise_kernel_grad(
        x, mean, mul, bias, g, kernel.shape, strides, padding, *bounds
    )
    # The BatchNorm's backward sums are taken as the input gradient writes its rows.
    g_normalized, *sums = native_input_grad(
        g, kernel, x.shape[1:3], strides, padding, (x, mean, mul, bias, bounds)
    )
    dx, dscale, dbias = _batch_norm_backward(activation, (x, mean, rstd, scale, bias), g_normalized, sums)
    return dx, dscale, dbias, dk


_batch_norm_depthwise_native.defvjp(_batch_norm_depthwise_native_fwd, _batch_norm_depthwise_native_bwd)


class LayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last axis (same ``scale`` and ``bias`` variables, so checkpoints and
    ``init_from`` carry over) computed by medjax's native kernel.

    Differentiated, XLA CPU spends on each LayerNorm two library reductions per direction that do not fuse
    their producers, plus materialised ``x - mean``, ``x_hat`` and ``g * scale``; in MedNeXt-tiny's step that
    came to about a fifth of the time (profiled). The forward and the closed-form backward are one native
    pass each (:func:`native.layer_norm`); export (:func:`native.xla_only`) and machines without the native
    kernels compute the same function in XLA. The variance is taken about the mean (two passes
    over a row), not as ``nn.LayerNorm``'s ``E[x^2] - E[x]^2``: the two agree to float32 rounding on the
    models' activations, and far from zero (rows near 1000) the latter cancels to errors of 0.1 and more.
    """

    epsilon: float = 1e-6
    scale_init: nn.initializers.Initializer = nn.initializers.ones_init()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, features, jnp.float32)
        bias = self.param("bias", self.bias_init, features, jnp.float32)
        return _layer_norm(x, scale, bias, self.epsilon, _native_float32(x))


def _layer_norm_xla(x, scale, bias, epsilon):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1)
    centred = xf - mean[..., None]
    rstd = lax.rsqrt(jnp.mean(centred * centred, axis=-1) + epsilon)
    return centred * rstd[..., None] * scale + bias, mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, native_value: bool):
    if native_value:
        return native.layer_norm(x, scale, bias, epsilon)[0].astype(x.dtype)
    return _layer_norm_xla(x, scale, bias, epsilon)[0].astype(x.dtype)


def _layer_norm_fwd(x, scale, bias, epsilon, native_value):
    if native_value:
        y, mean, rstd = native.layer_norm(x, scale, bias, epsilon)
    else:
        y, mean, rstd = _layer_norm_xla(x, scale, bias, epsilon)
    return y.astype(x.dtype), (x, scale, mean, rstd)


def _layer_norm_bwd(epsilon, native_value, residuals, g):
    del epsilon
    x, scale, mean, rstd = residuals
    if native_value:
        return native.layer_norm_backward(g, x, scale, mean, rstd)
    g = g.astype(jnp.float32)
    x_hat = (x.astype(jnp.float32) - mean[..., None]) * rstd[..., None]
    gs = g * scale
    mean_gs, mean_gs_x_hat = jnp.mean(gs, -1, keepdims=True), jnp.mean(gs * x_hat, -1, keepdims=True)
    dx = rstd[..., None] * (gs - mean_gs - x_hat * mean_gs_x_hat)
    rows = tuple(range(x.ndim - 1))
    return dx.astype(x.dtype), jnp.sum(g * x_hat, rows), jnp.sum(g, rows)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu(x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Exact (erf) GELU of ``z = x + bias``, ``z * Phi(z)``: the values of ``nn.gelu(z, approximate=False)``,
    cheaper to train.

    Differentiating ``nn.gelu`` keeps its erfc and exp intermediates as full-size residuals, and XLA CPU
    expands erfc and exp into long select chains: computing the value and derivative took 7.6x a ReLU's pass
    over ConvNeXt's widest map. Float32 inputs get the value, and under differentiation the derivative,
    from one native pass (:func:`native.gelu`, erf approximated as XLA does; near erf = -1, values up to
    6e-7 from XLA's erfc form); otherwise (export, :func:`native.xla_only`, or no native kernels) XLA
    computes them in one fusion. Either way one tensor, the derivative, is saved.
    On the native path the derivative has no derivative of its own: for second-order differentiation set
    ``MEDJAX_NATIVE=0`` (LayerNorm's custom VJP has the same limit).

    Args:
      x: ``(..., C)``.
      bias: ``(C,)`` (or a scalar), added first; pass a dense layer's bias here (``Dense(activation='gelu')``
        does) and the addition joins the GELU's pass, which a native call could not share with XLA's fusion.
    """
    bias = jnp.zeros((), x.dtype) if bias is None else bias
    return _gelu(x, bias, _native_float32(x, bias))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _gelu(x: jax.Array, bias: jax.Array, native_value: bool) -> jax.Array:
    if native_value:
        return native.gelu_value(x, bias).astype(x.dtype)
    z = x + bias
    return 0.5 * z * lax.erfc(-z * _INV_SQRT2)


@_gelu.defjvp
def _gelu_jvp(native_value, primals, tangents):
    (x, bias), (dx, dbias) = primals, tangents
    if native_value:
        y, derivative = native.gelu(x, bias)
    else:
        z = x + bias
        cdf = 0.5 * lax.erfc(-z * _INV_SQRT2)
        y, derivative = z * cdf, cdf + z * (_INV_SQRT_2PI * jnp.exp(-0.5 * z * z))
    return y, (dx + dbias) * derivative


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per example with probability ``rate``.

    Survivors are scaled by ``1 / (1 - rate)`` so the expected value is unchanged (timm's ``drop_path``).
    Uses the ``'dropout'`` RNG stream. The branch is multiplied by a per-example factor, as timm does: a
    ``jnp.where`` against zeros made XLA CPU write a full-size constant map per block for its backward pass
    (30 ms of ConvNeXt-Tiny's 224/batch 32 step).
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return x * (mask.astype(x.dtype) / keep)


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
    Both biases start at zero but the weights are random, so the initial gates scatter around one half
    (channel by channel and image by image) rather than sitting at it.
    """

    ratio: int = 16
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, v: jax.Array) -> jax.Array:
        channels = v.shape[-1]
        h = self.activation(nn.Dense(max(1, channels // self.ratio), name="reduce")(v))
        gate = nn.sigmoid(nn.Dense(channels, name="expand")(h))
        return v * gate
