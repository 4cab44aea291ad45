"""Tests for the classification architectures (MobileNetV2, ConvNeXt) and the model registry.

Facts at 224x224 (parameter counts, MACs, shapes) come from ``jax.eval_shape`` / ``jax.make_jaxpr`` so
nothing large is compiled; real forward passes use narrow models at 28-64 pixels, and each jitted
function is compiled once and shared through fixtures.
"""

import functools
import importlib.metadata
import os
import subprocess
import sys
from types import SimpleNamespace

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.extend.core import ClosedJaxpr, Jaxpr

from medjax.models import available_models, get_model, layers, native
from medjax.models.convnext import Block
from medjax.models.layers import BatchNorm, Conv, Dense, DepthwiseConv, LayerNorm, batch_norm, gelu
from medjax.models.mobilenet_v2 import InvertedResidual, conv_padding, make_divisible

IMPROVED = {"pooling": "avg+max", "fusion": "concat", "sevector_ratio": 16}  # study A's head
TINY = {
    "mobilenet_v2": {"width_multiplier": 0.35},
    "convnext": {"depths": (1, 1, 1, 1), "widths": (8, 16, 24, 32)},
}


@functools.cache
def _variables_shape_cached(name: str, channels: int, kwargs: tuple):
    model = get_model(name, **dict(kwargs))
    x = jax.ShapeDtypeStruct((1, 224, 224, channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _variables_shape(name: str, *, channels: int = 3, **kwargs):
    """Shapes of the variables at 224x224 (no computation); cached, several tests ask for the same."""
    return _variables_shape_cached(name, channels, tuple(sorted(kwargs.items())))


def _size(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _host_variables(model, x: jax.Array, *, seed: int = 0):
    """Random, well-scaled variables with the model's structure, drawn with numpy.

    XLA on CPU compiles every random initialiser separately (about 0.1 s each on this machine), so a
    jitted ``init`` of even a narrow MobileNetV2 costs 10+ s; tests that only need *some* weights draw
    them here (kernels ~ N(0, 1/fan_in); scales and layer-scale gammas ~ 1 so every residual branch is
    visible; BatchNorm running statistics at their initial 0 / 1). The models' own initialisers are
    tested once, on a one-stage ConvNeXt.
    """
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name in ("mean", "var"):
            return np.full(shape, float(name == "var"), np.float32)
        noise = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 1:
            return noise * 0.1 + (1.0 if name in ("scale", "gamma") else 0.0)
        return noise / np.sqrt(np.prod(shape[:-1]))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _batch(size: int, channels: int = 3) -> jax.Array:
    return jax.random.normal(jax.random.key(size * 10 + channels), (2, size, size, channels))


@pytest.fixture(scope="module", params=["mobilenet_v2", "convnext"])
def tiny(request):
    """A narrow model of each family at 32x32 with host-drawn variables and one jitted ``evaluate``.

    ``evaluate`` is shared by several tests (one compilation) and must never trace twice.
    """
    name = request.param
    model = get_model(name, num_classes=3, **TINY[name])
    x = _batch(32)
    # chex counts traces per source location, shared by both parametrisations: start this one at zero.
    chex.clear_trace_counter()
    evaluate = jax.jit(chex.assert_max_traces(lambda v, x: model.apply(v, x, train=False), n=1))
    return SimpleNamespace(
        name=name, model=model, x=x, variables=_host_variables(model, x), evaluate=evaluate
    )


# --- golden parameter counts and MACs at 224 ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("mobilenet_v2", {"num_classes": 1000}, 3_504_872),  # torchvision / PAPERS.md
        ("mobilenet_v2", {"num_classes": 2}, 2_226_434),
        ("mobilenet_v2", {"num_classes": 4}, 2_228_996),
        ("mobilenet_v2", {"num_classes": 1000, "width_multiplier": 0.35}, 1_677_128),
        ("mobilenet_v2", {"num_classes": 1000, "width_multiplier": 1.4}, 6_108_776),
        ("mobilenet_v2", {"num_classes": 2, "width_multiplier": 0.35}, 398_690),
        ("mobilenet_v2", {"num_classes": 2, "width_multiplier": 1.4}, 4_319_362),
        ("mobilenet_v2", {"num_classes": 2, "channels": 1}, 2_225_858),  # stem kernel 3x3x1x32
        ("convnext", {"num_classes": 1000}, 28_589_128),  # official ConvNeXt-T / PAPERS.md
        ("convnext", {"num_classes": 2}, 27_821_666),
        ("convnext", {"num_classes": 1000, **IMPROVED}, 29_655_208),
        ("convnext", {"num_classes": 2, **IMPROVED}, 28_121_282),
        ("convnext", {"num_classes": 4, **IMPROVED}, 28_124_356),
        ("convnext", {"num_classes": 2, **IMPROVED, "fusion": "sum"}, 27_896_210),
        ("convnext", {"num_classes": 1000, "variant": "small"}, 50_223_688),  # official 50.22 M
        ("convnext", {"num_classes": 1000, "variant": "base"}, 88_591_464),  # official 88.59 M
    ],
)
def test_golden_parameter_counts(name, kwargs, expected):
    assert _size(_variables_shape(name, **kwargs)["params"]) == expected


def test_improved_head_adds_layernorm_sevector_and_wider_classifier():
    """Hand count: LayerNorm over 1536 instead of 768, SEVector 1536->96->1536, Dense 1536 wide."""
    sevector = 1536 * 96 + 96 + 96 * 1536 + 1536
    extra = 2 * 768 + sevector + 768 * 1000
    improved = _size(_variables_shape("convnext", num_classes=1000, **IMPROVED)["params"])
    assert improved - 28_589_128 == extra


@pytest.mark.parametrize(("width", "millions"), [(0.35, 1.66), (1.0, 3.47), (1.4, 6.06)])
def test_mobilenet_widths_match_published_table(width, millions):
    """The TF-slim/Keras checkpoint table counts weights without BatchNorm (1000 classes)."""
    variables = _variables_shape("mobilenet_v2", num_classes=1000, width_multiplier=width)
    # BatchNorm has scale+bias in 'params' and mean+var in 'batch_stats': the same number of values.
    without_bn = _size(variables["params"]) - _size(variables["batch_stats"])
    assert round(without_bn / 1e6, 2) == millions


def _macs(jaxpr: Jaxpr) -> int:
    """Multiply-accumulates of the convolutions and matmuls in a jaxpr (recursing into sub-jaxprs)."""
    total = 0
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval.shape
        if eqn.primitive.name == "conv_general_dilated":
            kh, kw, cin, _ = eqn.invars[1].aval.shape  # HWIO
            total += int(np.prod(out)) * kh * kw * cin
        elif eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            total += int(np.prod(out)) * int(np.prod([eqn.invars[0].aval.shape[i] for i in contract]))
        for param in eqn.params.values():
            if isinstance(param, ClosedJaxpr | Jaxpr):
                total += _macs(param.jaxpr if isinstance(param, ClosedJaxpr) else param)
    return total


@pytest.mark.parametrize(
    ("name", "kwargs", "macs"),
    [
        ("mobilenet_v2", {"width_multiplier": 0.35}, 59_285_808),  # Keras table: 59 M
        ("mobilenet_v2", {}, 300_774_272),  # 300 M
        ("mobilenet_v2", {"width_multiplier": 1.4}, 582_195_824),  # 582 M
        ("convnext", {}, 4_455_531_264),  # official: 4.5 G
    ],
)
def test_macs_at_224(name, kwargs, macs):
    """Counts the MACs of the traced graph (no compilation; XLA's operations only, as export traces it);
    pins strides, paddings and widths."""
    model = get_model(name, num_classes=1000, depthwise_impl="xla", **kwargs)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = _variables_shape(name, num_classes=1000, **kwargs)
    with native.xla_only():
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x).jaxpr
    assert _macs(jaxpr) == macs


# --- parameter names (converters from Keras/torchvision depend on them) --------------------------------


def test_mobilenet_parameter_tree():
    params = _variables_shape("mobilenet_v2", num_classes=2)["params"]
    blocks = [f"block_{i}" for i in range(17)]
    assert sorted(params) == sorted(["stem", "stem_bn", *blocks, "head_conv", "head_bn", "classifier"])
    assert sorted(params["block_0"]) == ["depthwise", "depthwise_bn", "project", "project_bn"]
    assert jax.tree.map(lambda a: a.shape, params["block_1"]) == {
        "expand": {"kernel": (1, 1, 16, 96)},
        "expand_bn": {"scale": (96,), "bias": (96,)},
        "depthwise": {"kernel": (3, 3, 1, 96)},
        "depthwise_bn": {"scale": (96,), "bias": (96,)},
        "project": {"kernel": (1, 1, 96, 24)},
        "project_bn": {"scale": (24,), "bias": (24,)},
    }


def test_convnext_parameter_tree():
    params = _variables_shape("convnext", num_classes=2, **IMPROVED)["params"]
    blocks = [f"stage_{s}_block_{b}" for s, depth in enumerate((3, 3, 9, 3)) for b in range(depth)]
    downsample = [f"downsample_{s}_{layer}" for s in (1, 2, 3) for layer in ("norm", "conv")]
    expected = ["stem_conv", "stem_norm", *downsample, *blocks, "head_norm", "sevector", "classifier"]
    assert sorted(params) == sorted(expected)
    assert jax.tree.map(lambda a: a.shape, params["stage_1_block_0"]) == {
        "dwconv": {"kernel": (7, 7, 1, 192), "bias": (192,)},
        "norm": {"scale": (192,), "bias": (192,)},
        "pwconv1": {"kernel": (192, 768), "bias": (768,)},
        "pwconv2": {"kernel": (768, 192), "bias": (192,)},
        "gamma": (192,),
    }
    assert params["downsample_1_conv"]["kernel"].shape == (2, 2, 96, 192)
    assert params["sevector"]["reduce"]["kernel"].shape == (1536, 96)


# --- shapes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "num_classes", "features", "feature_map"),
    [
        ("mobilenet_v2", {}, 2, 1280, (7, 7, 1280)),
        ("mobilenet_v2", {"width_multiplier": 1.4}, 1000, 1792, (7, 7, 1792)),
        ("mobilenet_v2", {"width_multiplier": 0.35, "padding_style": "tf"}, 4, 1280, (7, 7, 1280)),
        ("convnext", {}, 2, 768, (7, 7, 768)),
        ("convnext", IMPROVED, 4, 1536, (7, 7, 768)),
        ("convnext", {**IMPROVED, "fusion": "sum"}, 1000, 768, (7, 7, 768)),
    ],
)
def test_shapes_at_224(name, kwargs, num_classes, features, feature_map):
    model = get_model(name, num_classes=num_classes, **kwargs)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = _variables_shape(name, num_classes=num_classes, **kwargs)
    logits, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert logits.shape == (2, num_classes)
    assert aux["features"].shape == (2, features)
    assert aux["feature_map"].shape == (2, *feature_map)


@pytest.mark.parametrize("name", ["mobilenet_v2", "convnext"])
@pytest.mark.parametrize(("size", "channels", "num_classes", "spatial"), [(28, 1, 2, 1), (64, 3, 5, 2)])
def test_forward_small_inputs(name, size, channels, num_classes, spatial):
    """MedMNIST-sized grey images run end to end (ConvNeXt: 28 -> 7 -> 4 -> 2 -> 1, no empty maps)."""
    model = get_model(name, num_classes=num_classes, **TINY[name])
    x = _batch(size, channels)
    logits, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(_host_variables(model, x), x)
    assert logits.shape == (2, num_classes)
    assert aux["feature_map"].shape[:3] == (2, spatial, spatial)
    assert aux["features"].shape == (2, aux["feature_map"].shape[-1])
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_initialisation():
    """The models' own initialisers, on a one-stage ConvNeXt (cheap to compile): zero head, gamma 1e-6."""
    model = get_model("convnext", num_classes=3, depths=(1,), widths=(8,))
    x = _batch(28, channels=1)
    (logits, aux), variables = jax.jit(lambda x: model.init_with_output(jax.random.key(0), x, train=False))(x)
    params = variables["params"]
    np.testing.assert_array_equal(logits, 0.0)  # uniform predictions at the start of fine-tuning
    chex.assert_trees_all_equal(params["classifier"], jax.tree.map(jnp.zeros_like, params["classifier"]))
    np.testing.assert_array_equal(params["stage_0_block_0"]["gamma"], np.float32(1e-6))
    assert 0.005 < float(jnp.std(params["stage_0_block_0"]["pwconv1"]["kernel"])) < 0.03  # trunc_normal(.02)
    assert float(jnp.std(aux["features"])) > 0


# --- train / eval behaviour --------------------------------------------------------------------------


def test_evaluation_is_deterministic_and_traced_once(tiny):
    logits, aux = tiny.evaluate(tiny.variables, tiny.x)
    for shift in (0.0, 1.0, 2.0):  # new values, same shapes: no retrace (assert_max_traces in the fixture)
        tiny.evaluate(tiny.variables, tiny.x + shift)
    np.testing.assert_array_equal(tiny.evaluate(tiny.variables, tiny.x)[0], logits)
    assert logits.shape == (2, 3) and float(jnp.abs(logits).max()) > 0
    assert set(aux) >= {"features", "feature_map"}


def test_depthwise_impls_agree(tiny):
    """'fast' and the XLA reference give the same outputs for the same parameters."""
    xla = get_model(tiny.name, num_classes=3, depthwise_impl="xla", **TINY[tiny.name])
    reference = jax.jit(lambda v, x: xla.apply(v, x, train=False))(tiny.variables, tiny.x)
    chex.assert_trees_all_close(tiny.evaluate(tiny.variables, tiny.x), reference, rtol=1e-4, atol=1e-5)


def test_drop_path_keeps_or_zeroes_whole_examples_scaled_by_the_keep_rate():
    """``DropPath(rate)`` in training: each example's branch is either all zero or ``x / (1 - rate)``, the
    same for its gradient; over 2,000 examples about ``1 - rate`` survive. Outside training it is ``x``."""
    rate = 0.25
    x = jax.random.normal(jax.random.key(0), (2000, 3, 2, 4))
    drop = layers.DropPath(rate)
    rngs = {"dropout": jax.random.key(1)}
    y = drop.apply({}, x, train=True, rngs=rngs)
    g = jax.grad(lambda x: jnp.sum(drop.apply({}, x, train=True, rngs=rngs)))(x)
    kept = np.asarray(jnp.all(y != 0, axis=(1, 2, 3)))
    dropped = np.asarray(jnp.all(y == 0, axis=(1, 2, 3)))
    assert np.all(kept | dropped)
    np.testing.assert_allclose(y[kept], x[kept] / (1 - rate), rtol=1e-6)
    np.testing.assert_array_equal(g[dropped], 0.0)
    np.testing.assert_allclose(g[kept], 1 / (1 - rate), rtol=1e-6)
    assert abs(kept.mean() - (1 - rate)) < 0.03
    np.testing.assert_array_equal(drop.apply({}, x, train=False), x)


def test_train_mode(tiny):
    """Dropout (MobileNetV2) / drop path (ConvNeXt) draw from the 'dropout' stream; BatchNorm learns.

    Evaluation is deterministic and never writes 'batch_stats' (it is immutable there, so a write would
    raise): both are exercised by the shared ``evaluate`` of the fixture.
    """
    overrides = {"dropout_rate": 0.5} if tiny.name == "mobilenet_v2" else {"drop_path_rate": 0.5}
    model = get_model(tiny.name, num_classes=3, **TINY[tiny.name], **overrides)

    @jax.jit
    def train(seed):
        rngs = {"dropout": jax.random.key(seed)}
        (logits, _), state = model.apply(
            tiny.variables, tiny.x, train=True, rngs=rngs, mutable=["batch_stats"]
        )
        return logits, state

    outputs = [train(seed) for seed in range(4)]
    assert any(not np.allclose(outputs[0][0], other[0]) for other in outputs[1:])
    if tiny.name == "convnext":
        assert outputs[0][1] == {}  # LayerNorm only: no running statistics
        return
    # Independent recomputation of the stem: 3x3 stride-2 conv with torchvision's symmetric padding.
    stem = jax.lax.conv_general_dilated(
        tiny.x,
        tiny.variables["params"]["stem"]["kernel"],
        (2, 2),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    stats = outputs[0][1]["batch_stats"]["stem_bn"]
    # Flax momentum 0.9 (= PyTorch 0.1): running <- 0.9 * running + 0.1 * batch, from mean 0 / var 1.
    np.testing.assert_allclose(stats["mean"], 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)), rtol=1e-4)


# --- blocks against numpy references ----------------------------------------------------------------


def _np_depthwise(x: np.ndarray, kernel: np.ndarray, stride: int, pads) -> np.ndarray:
    """Depthwise convolution as a sum of shifted, strided slices (kernel ``(kh, kw, 1, C)``)."""
    xp = np.pad(x, ((0, 0), *pads, (0, 0)))
    kh, kw = kernel.shape[:2]
    ho, wo = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
    return sum(
        xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride] * kernel[i, j, 0]
        for i in range(kh)
        for j in range(kw)
    )


def _np_bn(x, p, s, eps):
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


@pytest.mark.parametrize(
    ("style", "stride", "pads"),
    [("torch", 2, ((1, 1), (1, 1))), ("tf", 2, ((1, 1), (0, 1))), ("tf", 1, ((1, 1), (1, 1)))],
)
def test_inverted_residual_matches_numpy(style, stride, pads):
    """A 7x8 map: TensorFlow padding is symmetric on the odd axis and (0, 1) on the even one (Keras)."""
    block = InvertedResidual(out_channels=4, expansion=6, stride=stride, padding_style=style, bn_epsilon=1e-3)
    x = np.asarray(_batch(8, 4))[:, :7]
    v = _host_variables(block, x)
    rng = np.random.default_rng(1)  # non-trivial running statistics (positive, so valid variances)
    v["batch_stats"] = jax.tree.map(
        lambda a: np.abs(a + rng.normal(size=a.shape)).astype(np.float32), v["batch_stats"]
    )
    p, s = v["params"], v["batch_stats"]
    h = np.clip(_np_bn(x @ p["expand"]["kernel"][0, 0], p["expand_bn"], s["expand_bn"], 1e-3), 0, 6)
    h = _np_depthwise(h, p["depthwise"]["kernel"], stride, pads)
    h = np.clip(_np_bn(h, p["depthwise_bn"], s["depthwise_bn"], 1e-3), 0, 6)
    h = _np_bn(h @ p["project"]["kernel"][0, 0], p["project_bn"], s["project_bn"], 1e-3)
    expected = h + x if stride == 1 else h
    np.testing.assert_allclose(
        jax.jit(lambda v, x: block.apply(v, x, train=False))(v, x), expected, rtol=1e-4, atol=1e-4
    )


def test_convnext_block_matches_numpy():
    """Depthwise 7x7 (pad 3), LayerNorm eps 1e-6, exact-erf GELU, layer scale, residual."""
    block = Block()
    x = np.asarray(_batch(9, 4))
    p = _host_variables(block, x)["params"]
    h = _np_depthwise(x, p["dwconv"]["kernel"], 1, ((3, 3), (3, 3))) + p["dwconv"]["bias"]
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    h = h * p["norm"]["scale"] + p["norm"]["bias"]
    h = h @ p["pwconv1"]["kernel"] + p["pwconv1"]["bias"]
    h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))
    expected = x + p["gamma"] * (h @ p["pwconv2"]["kernel"] + p["pwconv2"]["bias"])
    np.testing.assert_allclose(
        jax.jit(lambda v, x: block.apply(v, x, train=False))({"params": p}, x), expected, rtol=1e-4, atol=1e-4
    )


def test_gelu_values_and_derivatives_match_float64_reference(native_impl):
    """``layers.gelu`` is exact GELU (scipy, float64) with the analytic derivative ``Phi(x) + x phi(x)``.

    The native kernel computes Phi as ``(1 + erf) / 2`` with erf approximated as XLA does for float32; where
    erf is near -1 its float32 spacing (6e-8) leaves derivatives off by up to about 3e-7 and values, ``x``
    times Phi, by up to 6e-7, hence those ``atol``. XLA's erfc formula (``MEDJAX_NATIVE=0``, and export)
    keeps 1e-7."""
    x = np.linspace(-9.0, 9.0, 1001)
    phi = np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi)
    cdf = 0.5 * scipy.special.erfc(-x / np.sqrt(2))
    x32 = jnp.asarray(x, jnp.float32)
    atol = 3e-7 if native_impl == "native" else 1e-7
    np.testing.assert_allclose(gelu(x32), x * cdf, rtol=1e-6, atol=2 * atol)  # |x| up to 9 times Phi's error
    np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x32), cdf + x * phi, rtol=1e-6, atol=atol)
    np.testing.assert_allclose(jax.grad(lambda v: gelu(v).sum())(x32), cdf + x * phi, atol=atol)
    np.testing.assert_allclose(gelu(x32), jax.nn.gelu(x32, approximate=False), rtol=1e-6, atol=2 * atol)
    with native.xla_only():
        np.testing.assert_allclose(jax.jit(gelu)(x32), x * cdf, rtol=1e-6, atol=1e-7)
    if native_impl == "native":  # the value-only kernel (evaluation) gives the same bits as the pair's value
        np.testing.assert_array_equal(native.gelu_value(x32, 0.5), native.gelu(x32, 0.5)[0])
    _, tangent = jax.jvp(gelu, (x32,), (jnp.full_like(x32, 2.0),))  # forward mode works too
    np.testing.assert_allclose(tangent, 2 * (cdf + x * phi), rtol=1e-6, atol=2 * atol)
    differentiated = str(jax.make_jaxpr(jax.grad(lambda v: gelu(v).sum()))(x32))
    assert (native.GELU in differentiated) == (native_impl == "native")


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 48), (7, 19)])
def test_dense_equals_flax_dense(native_impl, shape, activation):
    """``Dense`` is ``nn.Dense`` with ``nn.Dense``'s variables, and ``Dense(activation='gelu')`` is
    ``nn.gelu(nn.Dense(x))`` with the bias added inside the GELU: same outputs and gradients for the kernel,
    the bias and the input, with either implementation (native matmul and GELU, or XLA); feature counts a
    multiple of the native GELU's vector width and one that is not."""
    x = jax.random.normal(jax.random.key(1), shape)
    features = 2 * shape[-1] + shape[-1] % 2  # 96 and 39
    ours, flax_dense = Dense(features, activation=activation), nn.Dense(features)
    variables = ours.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(variables, flax_dense.init(jax.random.key(0), x))
    variables = jax.tree.map(lambda v: v + 0.3, variables)  # a non-zero bias
    weights = jax.random.normal(jax.random.key(3), (*shape[:-1], features))

    def loss(apply, variables, x):
        return jnp.sum(apply(variables, x) * weights)

    def reference(variables, x):
        y = flax_dense.apply(variables, x)
        return jax.nn.gelu(y, approximate=False) if activation else y

    np.testing.assert_allclose(ours.apply(variables, x), reference(variables, x), rtol=1e-5, atol=1e-6)
    ours_grads = jax.jit(jax.grad(functools.partial(loss, ours.apply), argnums=(0, 1)))(variables, x)
    reference_grads = jax.grad(functools.partial(loss, reference), argnums=(0, 1))(variables, x)
    chex.assert_trees_all_close(ours_grads, reference_grads, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        Dense(features, activation="relu").init(jax.random.key(0), x)


@pytest.mark.parametrize(
    ("transpose_a", "transpose_b"), [(False, False), (False, True), (True, False), (True, True)]
)
@pytest.mark.parametrize(
    ("m", "k", "n"), [(37, 5, 3), (300, 96, 40), (70_000, 24, 16), (50_000, 16, 40), (50, 96, 40)]
)
def test_native_matmul_equals_float64_products(m, k, n, transpose_a, transpose_b):
    """``native.matmul`` is ``op(a) @ op(b)`` for each pair of transposes, checked against float64, from a
    product too small to split to ones split across threads: by rows of the output, or (``transpose_a``,
    a weight gradient) by the 70,000-long contraction, whose partial products are added in a fixed order,
    so a second call gives the same bits. With ``transpose_a`` alone, the first three shapes take the
    swapped product ``(b^T a)^T`` (output taller than wide, contraction at least twice its height), the
    last two the direct one (wider than tall; a short contraction)."""
    if not native.matmul_available():
        pytest.skip("no native kernels, or no oneMKL")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if transpose_a else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if transpose_b else (k, n), dtype=np.float32)
    if transpose_a:  # the contraction runs over a's rows: make it the long side
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((n, m) if transpose_b else (m, n), dtype=np.float32)
    product = jax.jit(functools.partial(native.matmul, transpose_a=transpose_a, transpose_b=transpose_b))
    got = np.asarray(product(a, b))
    a64, b64 = (a.T if transpose_a else a).astype(np.float64), (b.T if transpose_b else b).astype(np.float64)
    expected = a64 @ b64
    scale = np.sqrt(np.abs(a64) ** 2 @ np.abs(b64) ** 2)  # each entry's float32 rounding grows with this
    assert got.shape == expected.shape
    assert np.all(np.abs(got - expected) <= 1e-5 * scale + 1e-6)
    np.testing.assert_array_equal(np.asarray(product(a, b)), got)
    with pytest.raises(ValueError, match="inner sizes differ"):
        native.matmul(
            a, b[:, :-1] if transpose_b else b[:-1], transpose_a=transpose_a, transpose_b=transpose_b
        )


def test_matmul_is_native_unless_xla_only(native_impl):
    """``layers.matmul``: its value and both gradients equal float64's with either implementation. The
    value and both gradients are native products where oneMKL is, none within ``native.xla_only()`` (what
    export traces under)."""
    rng = np.random.default_rng(1)
    a, b, g = (rng.standard_normal(s, dtype=np.float32) for s in ((50, 7), (7, 9), (50, 9)))
    loss = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(layers.matmul(a, b) * g), argnums=(0, 1)))
    value, (da, db) = loss(a, b)
    a64, b64, g64 = (x.astype(np.float64) for x in (a, b, g))
    np.testing.assert_allclose(value, np.sum((a64 @ b64) * g64), rtol=1e-5)
    np.testing.assert_allclose(da, g64 @ b64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, a64.T @ g64, rtol=1e-5, atol=1e-5)
    native_path = native_impl == "native" and native.matmul_available()
    value_only = jax.jit(lambda a, b: layers.matmul(a, b)).lower(a, b).compile().as_text()
    assert value_only.count(f'custom_call_target="{native.MATMUL}"') == (1 if native_path else 0)
    compiled = loss.lower(a, b).compile().as_text()
    assert compiled.count(f'custom_call_target="{native.MATMUL}"') == (3 if native_path else 0)
    with native.xla_only():  # the same jitted function, traced again
        assert "custom_call" not in loss.lower(a, b).as_text()


def test_products_use_onemkl_on_intel_cpus_and_where_forced(monkeypatch):
    """Dense layers take oneMKL's products on an Intel CPU, XLA's dot on others (where it was the faster),
    unless ``MEDJAX_MKL=1`` asks for oneMKL; ``MEDJAX_MKL=0`` refuses it everywhere."""
    if not native.matmul_available():
        pytest.skip("no native kernels, or no oneMKL")
    x, w = jnp.ones((8, 4)), jnp.ones((4, 3))

    def native_products(vendor: str, mkl: str | None) -> bool:
        monkeypatch.setattr(native, "cpu_vendor", lambda: vendor)
        if mkl is None:
            monkeypatch.delenv("MEDJAX_MKL", raising=False)
        else:
            monkeypatch.setenv("MEDJAX_MKL", mkl)
        hlo = jax.jit(lambda x, w: layers.matmul(x, w)).lower(x, w).as_text()
        return native.MATMUL in hlo

    assert native_products("GenuineIntel", None)
    assert not native_products("AuthenticAMD", None)
    assert native_products("AuthenticAMD", "1")
    assert not native_products("GenuineIntel", "0")


def test_a_wrong_mkl_path_warns_naming_it_and_falls_back(monkeypatch, tmp_path):
    """``MEDJAX_MKL`` naming a file that is not there: a warning naming the path, and XLA's dot."""
    missing = tmp_path / "libmkl_rt.so.3"
    monkeypatch.setenv("MEDJAX_MKL", str(missing))
    native._mkl.cache_clear()
    try:
        with pytest.warns(UserWarning, match=f"could not load oneMKL from {missing}"):
            assert native._mkl() is None
        assert not native.matmul_available()
    finally:
        native._mkl.cache_clear()


def test_evaluation_is_native_and_xla_only_traces_none_with_the_same_outputs():
    """A ConvNeXt's evaluation runs the native LayerNorm, GELU and (with oneMKL) products; within
    ``native.xla_only()`` the same jitted function is traced again with no custom call at all (what
    export needs), and both give the same outputs to float32 rounding."""
    if not native.available():
        pytest.skip("no C++ compiler")
    model = get_model("convnext", num_classes=3, **TINY["convnext"])
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    native_hlo = evaluate.lower(variables, x).as_text()
    targets = [native.LAYER_NORM, native.GELU_VALUE] + ([native.MATMUL] if native.matmul_preferred() else [])
    assert all(target in native_hlo for target in targets)
    native_logits = evaluate(variables, x)
    with native.xla_only():
        assert "custom_call" not in evaluate.lower(variables, x).as_text()
        xla_logits = evaluate(variables, x)
    np.testing.assert_allclose(native_logits, xla_logits, rtol=1e-5, atol=1e-5)


def test_native_kernels_stay_off_when_the_program_spans_several_devices():
    """With 2 (simulated) CPU devices the native kernels are off, with a warning saying why: a custom call
    in a partitioned program gets its operands all-gathered and computes the whole batch on every device.
    The batch-sharded gradient then has neither a native call nor an all-gather."""
    code = """
import warnings
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from medjax.models import layers, native
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert not native.available()
assert any("2 devices" in str(w.message) for w in caught), [str(w.message) for w in caught]
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.device_put(jnp.ones((64, 16)), NamedSharding(mesh, P("data")))
w = jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, P()))
hlo = jax.jit(jax.grad(lambda w, x: jnp.sum(layers.matmul(x, w) ** 2))).lower(w, x).compile().as_text()
assert "custom-call" not in hlo and "all-gather" not in hlo, hlo
print("ok")
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_matmul_falls_back_to_xla_without_onemkl(monkeypatch):
    """``MEDJAX_MKL=0`` turns the native product off; without the ``mkl`` package on an Intel CPU medjax
    says what that costs and the fix, once, and dense layers still train (on XLA's dot)."""
    monkeypatch.setenv("MEDJAX_MKL", "0")
    assert not native.matmul_available()
    monkeypatch.delenv("MEDJAX_MKL")

    def no_package(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_package)
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native.platform, "system", lambda: "Linux")
    monkeypatch.setattr(native, "cpu_vendor", lambda: "GenuineIntel")  # where oneMKL would be chosen
    native._mkl.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"oneMKL.*not installed.*pip install -r requirements.txt"):
            assert native._mkl() is None
        assert not native.matmul_available()
        a = jnp.ones((4, 3))
        np.testing.assert_allclose(jax.grad(lambda a: layers.matmul(a, a.T).sum())(a), 8 * np.ones((4, 3)))
    finally:
        native._mkl.cache_clear()


@pytest.mark.parametrize(
    ("size", "kernel", "strides", "padding"),
    [
        (17, (3, 3), 2, ((1, 1), (1, 1))),  # MobileNetV2's stem ('torch' padding), odd size
        (16, (3, 3), 2, "SAME"),  # ... 'tf' padding, asymmetric
        (16, (4, 4), 4, "VALID"),  # ConvNeXt's patchify stem
        (18, (4, 4), 4, "SAME"),  # MedNeXt's stem where the size is not a multiple of the stride
        (7, (2, 2), 2, "SAME"),  # downsampling an odd-sized map
        (9, (2, 2), 2, "VALID"),  # ... which drops the last row and column
        (8, (1, 1), 1, "SAME"),  # pointwise
        (8, (3, 1), (1, 2), "SAME"),  # neither: a rectangular kernel with unequal strides
    ],
)
def test_conv_equals_nn_conv_with_the_same_parameters(size, kernel, strides, padding):
    """``layers.Conv`` is ``nn.Conv`` computed another way: same parameter tree from the same key, and
    outputs and both gradients equal (float32 sums in another order)."""
    x = jax.random.normal(jax.random.key(1), (2, size, size + 1, 5))
    ours = Conv(6, kernel, strides=strides, padding=padding)
    flax_conv = nn.Conv(6, kernel, strides=strides, padding=padding)
    variables = ours.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(variables, flax_conv.init(jax.random.key(0), x))
    variables = jax.tree.map(lambda v: v + 0.1, variables)  # a non-zero bias

    def loss(module, v, x):
        return jnp.sum(jnp.sin(module.apply(v, x)))

    np.testing.assert_allclose(ours.apply(variables, x), flax_conv.apply(variables, x), rtol=1e-5, atol=1e-5)
    reference = Conv(6, kernel, strides=strides, padding=padding, impl="xla")  # what ONNX export traces
    np.testing.assert_allclose(reference.apply(variables, x), flax_conv.apply(variables, x), rtol=1e-6)
    ours_grads = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(variables, x)
    flax_grads = jax.grad(functools.partial(loss, flax_conv), argnums=(0, 1))(variables, x)
    chex.assert_trees_all_close(ours_grads, flax_grads, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native.available(), reason="no C++ compiler")
@pytest.mark.parametrize(
    ("shape", "kernel", "strides"), [((2, 11, 13, 3), (3, 3), (2, 2)), ((3, 9, 8, 5), (3, 2), (1, 2))]
)
def test_native_patches_equal_xla_and_differentiate_as_its_transpose(shape, kernel, strides):
    """Non-tiling patches (MobileNetV2's stem) come from the native kernel, bit for bit XLA's slices and
    concatenation, and their input gradient is XLA's transpose of those."""
    x = jax.random.normal(jax.random.key(4), shape)
    ours = functools.partial(layers._patches, kernel_size=kernel, strides=strides)
    xla = functools.partial(layers._patches_xla, kernel_size=kernel, strides=strides)
    assert native.PATCHES in str(jax.make_jaxpr(ours)(x))
    np.testing.assert_array_equal(ours(x), xla(x))
    g = jax.random.normal(jax.random.key(5), xla(x).shape)
    np.testing.assert_allclose(jax.vjp(ours, x)[1](g)[0], jax.vjp(xla, x)[1](g)[0], rtol=1e-6, atol=1e-6)


@pytest.fixture(params=["native", "xla"])
def native_impl(request, monkeypatch):
    """Runs a test with BatchNorm's sums, LayerNorm, GELU and (where oneMKL is installed, on any CPU:
    ``MEDJAX_MKL=1``) the products from medjax's native kernels, then from XLA (``MEDJAX_NATIVE=0``)."""
    if request.param == "native" and not native.available():
        pytest.skip("no C++ compiler")
    if request.param == "native":
        monkeypatch.setenv("MEDJAX_MKL", "1")
    else:
        monkeypatch.setenv("MEDJAX_NATIVE", "0")
    native._registered.cache_clear()
    yield request.param
    native._registered.cache_clear()


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_batch_norm_equals_flax_batch_norm(native_impl, activation):
    """``layers.BatchNorm`` is ``nn.BatchNorm`` with a closed-form backward: same variables, outputs,
    running averages and gradients, in training and evaluation, with either implementation of its sums;
    with ``activation``, ``nn.BatchNorm`` followed by ``jax.nn``'s ReLU or ReLU6, the clamp's mask inside
    the native backward sums."""
    train = jax.make_jaxpr(lambda x: BatchNorm().init_with_output(jax.random.key(0), x, False))
    assert (native.CHANNEL_SUMS in str(train(jnp.ones((2, 3, 3, 4))))) == (native_impl == "native")
    x = 3.0 * jax.random.normal(jax.random.key(1), (4, 5, 6, 7)) + 2.0
    ours = BatchNorm(momentum=0.9, epsilon=1e-3, activation=activation)
    flax_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-3)
    act = {None: lambda y: y, "relu": jax.nn.relu, "relu6": jax.nn.relu6}[activation]
    variables = ours.init(jax.random.key(0), x, use_running_average=False)
    chex.assert_trees_all_equal(variables, flax_bn.init(jax.random.key(0), x, use_running_average=False))
    keys = jax.random.split(jax.random.key(2), 2)
    variables = {  # scale 3 and bias 2 on average: outputs on both sides of 0 and of ReLU6's 6
        "params": {
            "scale": 3 + jax.random.normal(keys[0], (7,)),
            "bias": 2 + jax.random.normal(keys[1], (7,)),
        },
        "batch_stats": variables["batch_stats"],
    }
    weights = jax.random.normal(jax.random.key(3), x.shape)

    def loss(module, params, x):
        y, updates = module.apply(
            {**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"]
        )
        if module is flax_bn:
            y = act(y)
        return jnp.sum(jnp.tanh(y) * weights), (y, updates)

    ours_loss = functools.partial(loss, ours)
    differentiated = str(jax.make_jaxpr(jax.grad(ours_loss, argnums=1, has_aux=True))(variables["params"], x))
    clamped = native_impl == "native" and activation is not None
    assert (native.CLAMPED_CHANNEL_SUMS in differentiated) == clamped
    (_, (ours_y, ours_stats)), ours_grads = jax.value_and_grad(ours_loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x
    )
    (_, (flax_y, flax_stats)), flax_grads = jax.value_and_grad(
        functools.partial(loss, flax_bn), argnums=(0, 1), has_aux=True
    )(variables["params"], x)
    np.testing.assert_allclose(ours_y, flax_y, rtol=1e-5, atol=1e-5)
    if activation is not None:  # the clamp is active: some outputs at 0 (and at 6 for ReLU6)
        assert np.mean(flax_y == 0) > 0.05 and (activation == "relu" or np.mean(flax_y == 6) > 0.05)
    chex.assert_trees_all_close(ours_stats, flax_stats, rtol=1e-6, atol=1e-6)
    assert not np.allclose(ours_stats["batch_stats"]["mean"], 0.0)  # the averages moved
    chex.assert_trees_all_close(ours_grads, flax_grads, rtol=1e-5, atol=1e-5)
    stored = {**variables, "batch_stats": ours_stats["batch_stats"]}
    np.testing.assert_allclose(
        ours.apply(stored, x, use_running_average=True),
        act(flax_bn.apply(stored, x, use_running_average=True)),
        rtol=1e-6,
        atol=1e-6,
    )


class _NormThenDepthwise(nn.Module):
    """``batch_norm(train, activation)`` then a depthwise convolution: ``fused`` passes the convolution as
    the BatchNorm's ``then``, otherwise they are called one after the other."""

    fused: bool
    activation: str | None
    kernel: int
    stride: int
    padding: tuple
    dilation: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        conv = DepthwiseConv(
            self.kernel, strides=self.stride, padding=self.padding, dilation=self.dilation, name="conv"
        )
        if self.fused:
            return batch_norm(train, self.activation, conv, momentum=0.9, name="bn")(x)
        return conv(batch_norm(train, self.activation, momentum=0.9, name="bn")(x))


@pytest.mark.parametrize("activation", [None, "relu6"])
@pytest.mark.parametrize(
    ("channels", "kernel", "stride", "padding", "dilation"),
    [
        (37, 3, 1, ((1, 1), (1, 1)), 1),  # channel tails of 16-, 8- and 1-wide vectors
        (48, 3, 2, ((0, 1), (0, 1)), 1),  # TensorFlow-style stride 2 (MobileNetV2's 'tf' padding)
        (32, 7, 1, ((3, 3), (3, 3)), 1),  # the sliding tiles of 7-wide kernels
        (16, 3, 1, ((2, 2), (2, 2)), 2),  # dilated: not fused, the two run one after the other
    ],
)
def test_batch_norm_then_depthwise_equals_one_after_the_other(
    native_impl, activation, channels, kernel, stride, padding, dilation
):
    """``batch_norm(..., then=conv)`` computes what the BatchNorm and then the convolution compute: the same
    variables, outputs, running averages and gradients in training and evaluation. Fused into the native
    kernels where they take the geometry, with the BatchNorm's output never materialised."""
    x = 3.0 * jax.random.normal(jax.random.key(1), (3, 9, 11, channels)) + 1.0
    geometry = dict(activation=activation, kernel=kernel, stride=stride, padding=padding, dilation=dilation)
    fused, plain = _NormThenDepthwise(fused=True, **geometry), _NormThenDepthwise(fused=False, **geometry)
    variables = fused.init(jax.random.key(0), x, False)
    chex.assert_trees_all_equal(variables, plain.init(jax.random.key(0), x, False))
    variables["params"]["bn"] = {  # outputs on both sides of ReLU6's 0 and 6
        "scale": 3 + jax.random.normal(jax.random.key(2), (channels,)),
        "bias": 2 + jax.random.normal(jax.random.key(3), (channels,)),
    }

    def loss(module, params, x):
        y, updates = module.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
        return jnp.sum(jnp.tanh(y) * jnp.cos(jnp.arange(y.size).reshape(y.shape))), (y, updates)

    differentiate = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)
    program = str(jax.make_jaxpr(functools.partial(differentiate, fused))(variables["params"], x))
    normalized = native_impl == "native" and dilation == 1
    for target in (native.NORMALIZED_FORWARD, native.NORMALIZED_KERNEL_GRAD):
        assert (target in program) == normalized
    (_, (fused_y, fused_stats)), fused_grads = differentiate(fused, variables["params"], x)
    (_, (plain_y, plain_stats)), plain_grads = differentiate(plain, variables["params"], x)
    np.testing.assert_allclose(fused_y, plain_y, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(fused_stats, plain_stats, rtol=1e-6, atol=1e-6)
    # Kernel gradients are sums of ~100 products of size 30: an absolute tolerance on that scale.
    chex.assert_trees_all_close(fused_grads, plain_grads, rtol=1e-5, atol=1e-4)
    stored = {**variables, "batch_stats": fused_stats["batch_stats"]}
    np.testing.assert_array_equal(fused.apply(stored, x, False), plain.apply(stored, x, False))


@pytest.mark.parametrize("shape", [(2, 5, 7, 96), (4, 3, 3, 17), (6, 40)])
def test_layer_norm_equals_flax_layer_norm(native_impl, shape):
    """``layers.LayerNorm`` is ``nn.LayerNorm``: same variables, outputs and gradients, evaluated and
    differentiated, with either implementation; channel counts a multiple of the native kernel's vector
    width, one that is not, and the 2-D input of a pooled head."""
    x = 3.0 * jax.random.normal(jax.random.key(1), shape) + 2.0
    ours, flax_ln = LayerNorm(epsilon=1e-6), nn.LayerNorm(epsilon=1e-6)
    variables = ours.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(variables, flax_ln.init(jax.random.key(0), x))
    keys = jax.random.split(jax.random.key(2), 2)
    variables = {
        "params": {
            "scale": jax.random.normal(keys[0], shape[-1:]),
            "bias": jax.random.normal(keys[1], shape[-1:]),
        }
    }
    weights = jax.random.normal(jax.random.key(3), shape)

    def loss(module, variables, x):
        return jnp.sum(jnp.tanh(module.apply(variables, x)) * weights)

    differentiated = jax.make_jaxpr(jax.grad(functools.partial(loss, ours)))(variables, x)
    assert (native.LAYER_NORM_BACKWARD in str(differentiated)) == (native_impl == "native")
    np.testing.assert_allclose(ours.apply(variables, x), flax_ln.apply(variables, x), rtol=1e-5, atol=1e-5)
    ours_loss, ours_grads = jax.jit(jax.value_and_grad(functools.partial(loss, ours), argnums=(0, 1)))(
        variables, x
    )
    flax_loss, flax_grads = jax.value_and_grad(functools.partial(loss, flax_ln), argnums=(0, 1))(variables, x)
    np.testing.assert_allclose(ours_loss, flax_loss, rtol=1e-5)
    chex.assert_trees_all_close(ours_grads, flax_grads, rtol=1e-5, atol=1e-5)


def test_layer_norm_variance_is_taken_about_the_mean(native_impl):
    """On rows far from zero (offset 1000, unit spread) the variance comes from ``x - mean``, not from
    ``E[x^2] - E[x]^2``, which cancels to about 0.1 in float32: outputs and gradients match float64."""
    x = jax.random.normal(jax.random.key(0), (64, 48)) + 1000.0
    g = jax.random.normal(jax.random.key(1), x.shape)
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    x_hat = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    dx64 = (g64 - g64.mean(-1, keepdims=True) - x_hat * (g64 * x_hat).mean(-1, keepdims=True)) / np.sqrt(
        x64.var(-1, keepdims=True) + 1e-6
    )
    variables = {"params": {"scale": jnp.ones(48), "bias": jnp.zeros(48)}}
    y, pullback = jax.vjp(lambda v, x: LayerNorm(epsilon=1e-6).apply(v, x), variables, x)
    dv, dx = pullback(g)
    np.testing.assert_allclose(y, x_hat, atol=2e-3)  # x itself carries float32's 6e-5 at 1000
    np.testing.assert_allclose(dx, dx64, atol=2e-3)
    np.testing.assert_allclose(dv["params"]["scale"], (g64 * x_hat).sum(0), atol=2e-2)


def test_native_clamped_channel_sums_equal_float64_sums():
    """``native.clamped_channel_sums`` is ``(sum(gm), sum(gm * x))`` with ``gm`` the cotangent where the
    BatchNorm's output lies strictly inside the clamp's bounds (float64 reference), for ReLU6 and for ReLU's
    unbounded top; a 19-channel map (not a multiple of a vector) over 3 x 41 x 5 rows."""
    if not native.available():
        pytest.skip("no C++ compiler")
    keys = jax.random.split(jax.random.key(0), 5)
    g, x = (jax.random.normal(k, (3, 41, 5, 19)) for k in keys[:2])
    mean, bias = (jax.random.normal(k, (19,)) for k in keys[2:4])
    mul = 4 * jax.random.normal(keys[4], (19,))  # negative scales too: the mask then flips with x
    g64, x64 = np.asarray(g, np.float64).reshape(-1, 19), np.asarray(x, np.float64).reshape(-1, 19)
    z = (x64 - np.asarray(mean)) * np.asarray(mul) + np.asarray(bias)
    for lo, hi in [(0.0, 6.0), (0.0, np.inf)]:
        gm = np.where((z > lo) & (z < hi), g64, 0.0)
        assert 0.2 < np.mean(gm != 0) < 0.8
        sums = jax.jit(native.clamped_channel_sums, static_argnums=(5, 6))
        total, dot = sums(g, x, mean, mul, bias, lo, hi)
        np.testing.assert_allclose(total, gm.sum(0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(dot, (gm * x64).sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not native.available(), reason="no C++ compiler")
@pytest.mark.parametrize("shape", [(32, 56, 56, 24), (3, 5, 7, 17), (1, 1, 1, 1)])
def test_native_channel_sums_equal_float64_sums(shape):
    """One pass gives ``sum(a)`` and ``sum(a * b)`` per channel to float32 rounding of the exact sums, also
    over 100,000 rows of a large offset (float32 accumulation alone would drift by about 1e-4), with a
    channel count that is no multiple of the vector width, and with ``b`` the same array as ``a``."""
    a = jax.random.normal(jax.random.key(0), shape) + 3.0
    b = jax.random.normal(jax.random.key(1), shape)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    axes = tuple(range(len(shape) - 1))
    total, dot = jax.jit(native.channel_sums)(a, b)
    np.testing.assert_allclose(total, a64.sum(axes), rtol=1e-6)
    # sum(a * b) cancels: its error is bounded by the sum of the magnitudes, not by the result.
    assert np.all(np.abs(dot - (a64 * b64).sum(axes)) <= 1e-6 * np.abs(a64 * b64).sum(axes))
    total, square = jax.jit(native.channel_sums)(a, a)
    np.testing.assert_allclose(square, (a64 * a64).sum(axes), rtol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        native.channel_sums(a, jnp.zeros((*shape[:-1], shape[-1] + 1)))


# --- padding, registry, configuration errors --------------------------------------------------------


def test_padding_rules():
    assert (make_divisible(32 * 0.35), make_divisible(24 * 0.75), make_divisible(96 * 1.4)) == (16, 24, 136)
    assert conv_padding((224, 224), kernel=3, stride=2, style="torch") == ((1, 1), (1, 1))
    assert conv_padding((224, 224), kernel=3, stride=2, style="tf") == ((0, 1), (0, 1))
    assert conv_padding((7, 8), kernel=3, stride=2, style="tf") == ((1, 1), (0, 1))  # TF 'SAME' at odd size
    assert conv_padding((7, 8), kernel=3, stride=1, style="tf") == ((1, 1), (1, 1))


@pytest.mark.parametrize("tiny", ["mobilenet_v2"], indirect=True)
def test_padding_style_changes_outputs_not_parameters(tiny):
    """Same weights, 'torch' vs 'tf' padding: the image border is sampled differently."""
    tf_model = get_model("mobilenet_v2", num_classes=3, padding_style="tf", **TINY["mobilenet_v2"])
    chex.assert_trees_all_equal_shapes(tiny.variables, _host_variables(tf_model, tiny.x))
    tf_xla = get_model(
        "mobilenet_v2", num_classes=3, padding_style="tf", depthwise_impl="xla", **TINY["mobilenet_v2"]
    )
    features_tf, reference = jax.jit(
        lambda v, x: [m.apply(v, x, train=False)[1]["features"] for m in (tf_model, tf_xla)]
    )(tiny.variables, tiny.x)
    np.testing.assert_allclose(features_tf, reference, rtol=1e-4, atol=1e-5)  # asymmetric pads, both impls
    assert not np.allclose(tiny.evaluate(tiny.variables, tiny.x)[1]["features"], features_tf)
    with pytest.raises(ValueError, match="padding_style"):
        get_model("mobilenet_v2", num_classes=3, padding_style="keras").apply(
            tiny.variables, tiny.x, train=False
        )


def test_registry():
    assert {"convnext", "mobilenet_v2"} <= set(available_models())
    assert "layers" not in available_models() and "depthwise" not in available_models()
    with pytest.raises(ValueError, match=r"Unknown model_name 'resnet'.*convnext.*mobilenet_v2"):
        get_model("resnet", num_classes=2)


def test_convnext_config_errors():
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    with pytest.raises(ValueError, match="variant"):
        jax.eval_shape(
            get_model("convnext", num_classes=2, variant="huge").init, jax.random.key(0), x, train=False
        )
    mismatched = get_model("convnext", num_classes=2, depths=(1, 1), widths=(8, 16, 24))
    with pytest.raises(ValueError, match="one entry per stage"):
        jax.eval_shape(mismatched.init, jax.random.key(0), x, train=False)
