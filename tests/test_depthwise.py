"""Parity of the fast depthwise convolution (forward and both gradients) against XLA's grouped convolution,
by the pure-XLA shifted sums and row loop and by the native kernels."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.errors import MedjaxError
from medjax.models import native
from medjax.models.depthwise import DepthwiseConv, depthwise_conv2d, resolve_padding

jax.config.update("jax_platforms", "cpu")

RTOL = 1e-5
# 'fast' is whichever of 'loop' and 'native' is available.
FAST_IMPLS = [
    "loop",
    pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="no C++ compiler")),
]


def _rel_err(a, b) -> float:
    """max|a - b| / max|b|: robust to entries that are near zero, unlike an elementwise relative error."""
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _fwd_and_grads(impl, x, kernel, **conv):
    def f(x, kernel):
        return depthwise_conv2d(x, kernel, impl=impl, **conv)

    y, vjp = jax.vjp(f, x, kernel)
    # A fixed, non-uniform cotangent so every output position carries a different weight.
    g = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
    return (y, *vjp(g))


def _jit_fwd_and_grads(impl, x, kernel, **conv):
    return jax.jit(lambda x, kernel: _fwd_and_grads(impl, x, kernel, **conv))(x, kernel)


def _cases():
    """Kernels 3-11, strides 1-2, dilation 1 and 3 (the MedNeXt branch), symmetric/valid/TF-style padding.

    Not the full product (compiling a large-kernel gradient takes seconds), but every kernel size, dilation
    and padding kind appears. Small kernels run on an odd-by-even 7x8 input, large or dilated ones on 13x13;
    the rectangular test below covers even sizes, mixed strides and asymmetric explicit padding.
    """
    grid = [(3, s, 1, pad) for s in (1, 2) for pad in ("SAME", "VALID", "TF")]
    grid += [(5, 2, 1, "TF"), (7, 1, 1, "SAME"), (7, 2, 1, "TF")]
    grid += [(11, 1, 1, "SAME"), (11, 2, 1, "VALID"), (7, 1, 3, "SAME"), (7, 2, 3, "SAME")]
    grid += [(3, s, 3, pad) for s in (1, 2) for pad in ("SAME", "TF")]
    cases = []
    for k, stride, dil, pad in grid:
        hw = (13, 13) if k >= 7 or dil > 1 else (7, 8)
        padding = ((0, 1), (0, 1)) if pad == "TF" else resolve_padding(pad, (k, k), (dil, dil))
        cases.append(pytest.param(hw, k, stride, dil, padding, id=f"k{k}-s{stride}-d{dil}-{pad}"))
    return cases


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize(("hw", "k", "stride", "dil", "padding"), _cases())
def test_matches_xla(hw, k, stride, dil, padding, impl):
    channels = 3 if k % 2 else 8
    kx, kk = jax.random.split(jax.random.key(k * 100 + stride * 10 + dil))
    x = jax.random.normal(kx, (2, *hw, channels))
    kernel = jax.random.normal(kk, (k, k, 1, channels))
    conv = dict(strides=(stride, stride), padding=padding, dilation=(dil, dil))
    fast, ref = (_jit_fwd_and_grads(i, x, kernel, **conv) for i in (impl, "xla"))
    for name, a, b in zip(("y", "dx", "dkernel"), fast, ref, strict=True):
        assert a.shape == b.shape, name
        assert _rel_err(a, b) < RTOL, (name, _rel_err(a, b))


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_rectangular_kernel_and_mixed_strides(impl):
    x = jax.random.normal(jax.random.key(0), (3, 9, 12, 8))
    kernel = jax.random.normal(jax.random.key(1), (3, 5, 1, 8))
    conv = dict(strides=(2, 1), padding=((1, 2), (0, 3)), dilation=(2, 1))
    fast, ref = (_jit_fwd_and_grads(i, x, kernel, **conv) for i in (impl, "xla"))
    for a, b in zip(fast, ref, strict=True):
        assert _rel_err(a, b) < RTOL


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize(("k", "stride", "channels"), [(7, 1, 37), (3, 2, 48)])
def test_bias_and_its_gradient_match_xla(impl, k, stride, channels):
    """A bias given to the convolution (the native forward starts its sums at it, and the kernel gradient
    sums the cotangent for it) equals XLA's convolution plus the bias, in value and all three gradients;
    37 channels take every vector width of the kernels."""
    keys = jax.random.split(jax.random.key(11), 3)
    x = jax.random.normal(keys[0], (2, 9, 10, channels))
    kernel = jax.random.normal(keys[1], (k, k, 1, channels))
    bias = jax.random.normal(keys[2], (channels,))
    conv = dict(strides=(stride, stride), padding=resolve_padding("SAME", (k, k), (1, 1)))

    def fwd_and_grads(impl):
        y, vjp = jax.vjp(lambda *a: depthwise_conv2d(*a[:2], bias=a[2], impl=impl, **conv), x, kernel, bias)
        return (y, *vjp(jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)))

    ours, ref = jax.jit(lambda: fwd_and_grads(impl))(), fwd_and_grads("xla")
    for name, a, b in zip(("y", "dx", "dkernel", "dbias"), ours, ref, strict=True):
        assert a.shape == b.shape and _rel_err(a, b) < RTOL, (name, _rel_err(a, b))
    program = str(jax.make_jaxpr(lambda: fwd_and_grads(impl))())
    native_path = impl == "native"
    assert (native.FORWARD_WITH_BIAS in program) == native_path
    assert (native.KERNEL_AND_BIAS_GRAD in program) == native_path


def test_hand_computed_value():
    """A 2x2 all-ones kernel on a 3x3 ramp sums each 2x2 window: pins the correlation orientation."""
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    y = depthwise_conv2d(x, jnp.ones((2, 2, 1, 1)), impl="fast")
    np.testing.assert_allclose(np.asarray(y)[0, :, :, 0], [[8.0, 12.0], [20.0, 24.0]])


def test_remat_and_bfloat16_run():
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 1, 4))

    def loss(kernel, x, impl):
        return jnp.sum(depthwise_conv2d(x, kernel, padding=((1, 1), (1, 1)), impl=impl) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=2)
    g_remat = jax.jit(jax.grad(jax.checkpoint(lambda k: loss(k, x, "fast"))))(kernel)
    assert _rel_err(g_remat, grad(kernel, x, "xla")) < RTOL
    g16 = grad(kernel.astype(jnp.bfloat16), x.astype(jnp.bfloat16), "fast")
    assert g16.dtype == jnp.bfloat16
    assert _rel_err(g16.astype(jnp.float32), g_remat) < 5e-2


def test_module_same_output_for_both_impls():
    x = jax.random.normal(jax.random.key(4), (2, 10, 10, 6))
    fast = DepthwiseConv(kernel_size=7, strides=2, dilation=1, impl="fast")
    params = jax.jit(fast.init)(jax.random.key(5), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero bias
    y_fast = jax.jit(fast.apply)(params, x)
    y_xla = jax.jit(DepthwiseConv(kernel_size=7, strides=2, dilation=1, impl="xla").apply)(params, x)
    assert params["params"]["kernel"].shape == (7, 7, 1, 6)
    assert _rel_err(y_fast, y_xla) < RTOL


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="depthwise_impl"):
        depthwise_conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), impl="cuda")


@pytest.mark.skipif(not native.available(), reason="no C++ compiler")
@pytest.mark.parametrize(
    ("hw", "channels", "k", "stride", "dil"),
    # Channels: 83 is, for the kernel gradient, a 4-vector tile, a single vector and 3 scalar channels, and
    # for the forward two 32-channel tiles, a 16-vector and 3 scalars; 91 adds the forward's 8-vector; at
    # 200 the rows split into a chunk per thread (two, the second starting inside an image). Width 15
    # holds a full 8-column tile of the forward's interior.
    # 13 is wider than the kernel gradient's compiled widths (up to 11): one tap column at a time.
    # A 2x2 map under a 7x7 kernel (ConvNeXt's last stage at 64 px) has no interior column at all.
    # Stride 1 and dilation 1 over whole 16-channel vectors take the sliding tiles: width 37 is two
    # 16-column tiles, a 4-column and a single one; 48 channels are, for the kernel gradient's sliding
    # rows, a pair of vectors and a single one. A 3x3 kernel's edge columns are tiles of their own: at
    # width 37 one per side, and the 35 between are two 16-column tiles and three single ones.
    [
        ((9, 37), 48, 7, 1, 1),
        ((6, 37), 32, 3, 1, 1),
        ((17, 15), 16, 3, 1, 1),
        ((17, 15), 83, 3, 2, 1),
        ((17, 15), 91, 7, 1, 3),
        ((17, 15), 200, 5, 1, 1),
        ((17, 15), 40, 13, 1, 1),
        ((2, 2), 24, 7, 1, 1),
    ],
)
def test_native_equals_the_loop(hw, channels, k, stride, dil):
    x = jax.random.normal(jax.random.key(channels), (3, *hw, channels))
    kernel = jax.random.normal(jax.random.key(k), (k, k, 1, channels))
    conv = dict(
        strides=(stride, stride), padding=resolve_padding("SAME", (k, k), (dil, dil)), dilation=(dil, dil)
    )
    native_out, loop_out = (_jit_fwd_and_grads(impl, x, kernel, **conv) for impl in ("native", "loop"))
    for name, a, b in zip(("output", "input gradient", "kernel gradient"), native_out, loop_out, strict=True):
        assert _rel_err(a, b) < RTOL, name


@pytest.mark.skipif(not native.available(), reason="no C++ compiler")
@pytest.mark.parametrize("padding", [((0, 0), (4, 0)), ((2, 2), (0, 4)), ((0, 0), (0, 0))])
def test_native_sliding_tiles_at_uneven_edges(padding):
    """The sliding tiles' edges (a tile reading left or right padding) under asymmetric and no padding,
    against XLA's convolution."""
    x = jax.random.normal(jax.random.key(8), (2, 6, 29, 32))
    kernel = jax.random.normal(jax.random.key(9), (5, 5, 1, 32))
    conv = dict(strides=(1, 1), padding=padding, dilation=(1, 1))
    native_out, xla_out = (_jit_fwd_and_grads(impl, x, kernel, **conv) for impl in ("native", "xla"))
    for name, a, b in zip(("output", "input gradient", "kernel gradient"), native_out, xla_out, strict=True):
        assert a.shape == b.shape and _rel_err(a, b) < RTOL, name


@pytest.mark.skipif(not native.available(), reason="no C++ compiler")
@pytest.mark.parametrize(
    ("shape", "k", "stride", "padding"),
    # (3, 30, 30, 64) is large enough for a chunk of rows per thread (on two, the second starting inside the
    # second image), each with its own normalized rows and sums.
    [
        ((2, 10, 13, 37), 3, 2, ((1, 1), (1, 1))),
        ((2, 10, 13, 37), 7, 1, ((3, 3), (3, 3))),
        ((3, 30, 30, 64), 3, 1, ((1, 1), (1, 1))),
    ],
)
def test_native_normalized_kernels_equal_xla_on_the_normalized_map(shape, k, stride, padding):
    """The normalized forward and kernel gradient are XLA's convolution and kernel gradient of
    ``clip((x - mean) * mul + bias, 0, 6)``; a NaN in ``x`` reaches the outputs that read it, as it does
    through XLA's clamp (a diverged run must not look finite)."""
    keys = jax.random.split(jax.random.key(10), 6)
    channels = shape[-1]
    x = 3.0 * jax.random.normal(keys[0], shape)
    mean, mul, bias = jax.random.normal(keys[1], (3, channels))
    kernel = jax.random.normal(keys[2], (k, k, 1, channels))
    conv = dict(strides=(stride, stride), padding=padding)
    normalized = jnp.clip((x - mean) * mul + bias, 0.0, 6.0)
    y = depthwise_conv2d(normalized, kernel, impl="xla", **conv)
    g = jax.random.normal(keys[3], y.shape)
    dk = jax.grad(lambda kk: jnp.sum(depthwise_conv2d(normalized, kk, impl="xla", **conv) * g))(kernel)
    args = (x, mean, mul, bias)
    assert _rel_err(native.normalized_depthwise_forward(*args, kernel, *conv.values(), 0.0, 6.0), y) < RTOL
    native_dk = native.normalized_depthwise_kernel_grad(*args, g, kernel.shape, *conv.values(), 0.0, 6.0)
    assert _rel_err(native_dk, dk) < RTOL
    poisoned = x.at[1, 4, 5, 3].set(jnp.nan)
    y_nan = native.normalized_depthwise_forward(poisoned, mean, mul, bias, kernel, *conv.values(), 0.0, 6.0)
    assert bool(jnp.isnan(y_nan[1, :, :, 3]).any()) and not bool(jnp.isnan(y_nan[0]).any())
    with pytest.raises(ValueError, match="normalized_supports"):
        native._normalized_attrs(kernel.shape, conv["strides"], padding, (2, 2), 0.0, 6.0)


@pytest.mark.skipif(not native.available(), reason="no C++ compiler")
def test_native_input_gradient_with_clamped_sums_equals_the_two_calls():
    """The input gradient that also sums BatchNorm's clamped backward sums of what it writes equals the
    plain forward kernel followed by ``native.clamped_channel_sums``: a stride-2 input gradient (the
    cotangent dilated by 2) over 37 channels, the sums ordered per task and summed in double."""
    keys = jax.random.split(jax.random.key(12), 4)
    g = jax.random.normal(keys[0], (3, 5, 6, 37))
    kernel = jax.random.normal(keys[1], (3, 3, 1, 37))
    bn_input = 3.0 * jax.random.normal(keys[2], (3, 10, 12, 37))
    mean, mul, bias = jax.random.normal(keys[3], (3, 37)) + jnp.array([[0.0], [1.0], [2.0]])
    padding, dilation = ((1, 2), (1, 2)), (2, 2)
    y, sg, sgx = native.depthwise_forward_clamped_sums(
        g, kernel, padding, dilation, bn_input, mean, mul, bias, 0, 6
    )
    y_ref = native.depthwise_forward(g, kernel, (1, 1), padding, (1, 1), dilation)
    sg_ref, sgx_ref = native.clamped_channel_sums(y_ref, bn_input, mean, mul, bias, 0.0, 6.0)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(sg, sg_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sgx, sgx_ref, rtol=1e-5, atol=1e-4)
    assert float(jnp.mean(jnp.abs(sg))) > 0 and not np.allclose(sg, jnp.sum(y_ref, axis=(0, 1, 2)))  # masked


@pytest.mark.skipif(not native.available(), reason="no C++ compiler")
@pytest.mark.parametrize(("shape", "channels"), [((2, 13, 13), 37), ((3, 20, 20), 64)])
def test_native_streamed_outputs_equal_the_stored_ones(monkeypatch, shape, channels):
    """Rows written through the row buffer with streaming stores (``native.STREAM_OUTPUT_BYTES``, set for
    large outputs) are the rows stored directly, bit for bit: the forward with and without bias, the
    normalized forward and the input gradient with its clamped sums. 13 columns of 37 channels start most
    rows off the streaming stores' alignment; 20 rows of 64 channels split into a chunk per thread."""
    keys = jax.random.split(jax.random.key(14), 5)
    x = 3.0 * jax.random.normal(keys[0], (*shape, channels))
    kernel = jax.random.normal(keys[1], (3, 3, 1, channels))
    mean, mul, bias = jax.random.normal(keys[2], (3, channels))
    gh, gw = shape[1] // 2, shape[2] // 2
    g = jax.random.normal(keys[3], (shape[0], gh, gw, channels))
    bn_input = x[:, : 2 * gh, : 2 * gw]  # Shaped as g's input gradient through a 3x3, stride 2.
    same, tf = ((1, 1), (1, 1)), ((1, 2), (1, 2))

    def outputs():
        return (
            native.depthwise_forward(x, kernel, (2, 2), same, (1, 1)),
            native.depthwise_forward(x, kernel, (1, 1), same, (1, 1), bias=bias),
            native.normalized_depthwise_forward(x, mean, mul, bias, kernel, (1, 1), same, 0.0, 6.0),
            *native.depthwise_forward_clamped_sums(g, kernel, tf, (2, 2), bn_input, mean, mul, bias, 0, 6),
        )

    monkeypatch.setattr(native, "STREAM_OUTPUT_BYTES", 1 << 62)
    stored = outputs()
    monkeypatch.setattr(native, "STREAM_OUTPUT_BYTES", 0)
    names = ("forward", "with bias", "normalized", "input grad", "sg", "sgx")
    for name, a, b in zip(names, outputs(), stored, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_fast_is_native_when_it_builds_else_the_loop(monkeypatch):
    x = jax.random.normal(jax.random.key(6), (2, 6, 6, 4))
    kernel = jax.random.normal(jax.random.key(7), (3, 3, 1, 4))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: depthwise_conv2d(x, k, impl="fast").sum()))(kernel))
    for target in (native.FORWARD, native.KERNEL_GRAD):
        assert (target in jaxpr) == native.available()
    monkeypatch.setenv("MEDJAX_NATIVE", "0")
    native._registered.cache_clear()
    try:
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: depthwise_conv2d(x, k, impl="fast").sum()))(kernel))
        assert "medjax_depthwise" not in jaxpr and "scan" in jaxpr  # The row loop.
        with pytest.raises(MedjaxError, match="MEDJAX_NATIVE=0"):
            jax.grad(lambda k: depthwise_conv2d(x, k, impl="native").sum())(kernel)
    finally:
        native._registered.cache_clear()


def test_no_compiler_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native._registered.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
            assert not native.available()
    finally:
        native._registered.cache_clear()


def test_failed_build_shows_the_compiler_output(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDJAX_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", (broken,))
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    with pytest.raises(MedjaxError, match=r"Building broken.cc failed .*\n.*error"):
        native.build(compiler)
    assert not list((tmp_path / "native").glob("*.so"))  # No half-written library is left to load.
    native._registered.cache_clear()
    try:  # Training goes on without the speed-up, and the warning carries the reason.
        with pytest.warns(UserWarning, match="native kernels unavailable.*Building broken.cc failed"):
            assert not native.available()
    finally:
        native._registered.cache_clear()
