"""The modules that carry studies A and B, each against an independent numpy computation.

Study A's head (``GlobalPool`` dual pooling, ``SEVector``) and study B's three modules (Spatial Encoding,
Linear Attention FFN in both forms, Smooth depthwise FFN) on small maps with random numpy-drawn weights
(biases included, so a dropped bias shows), in float64 numpy against float32 JAX.
"""

import jax
import numpy as np
import pytest
import scipy.special

from medjax.models.layers import GlobalPool, SEVector
from medjax.models.mednext_plos import LinearAttentionFFN, SmoothFFN, SpatialEncoding

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 6, 7, 8)).astype(np.float32)  # Non-square, so transposed axes would show.


def _variables(module, x, *, seed: int = 0) -> dict:
    """Every parameter drawn from N(0, 1/fan_in) (vectors: N(0, 0.3)), with the module's structure."""
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
    rng = np.random.default_rng(seed)

    def draw(leaf):
        noise = rng.standard_normal(leaf.shape)
        scale = 0.3 if len(leaf.shape) == 1 else 1 / np.sqrt(np.prod(leaf.shape[:-1]))
        return (noise * scale).astype(np.float32)

    return jax.tree.map(draw, shapes)


def _apply(module, variables, x) -> np.ndarray:
    return np.asarray(jax.jit(module.apply)(variables, x))


def _dense(x, p):
    return x.astype(np.float64) @ p["kernel"] + p["bias"]


def _depthwise(x, p, dilation: int = 1):
    """'SAME' depthwise convolution with bias: each channel with its own (k, k) filter."""
    k = p["kernel"].shape[0]
    pad = dilation * (k - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1:3]
    out = sum(
        xp[:, i * dilation : i * dilation + h, j * dilation : j * dilation + w] * p["kernel"][i, j, 0]
        for i in range(k)
        for j in range(k)
    )
    return out + p["bias"]


def _gelu(x):
    return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(
    ("mode", "fusion", "expected"),
    [
        ("avg", "concat", lambda x: x.mean((1, 2))),
        ("max", "concat", lambda x: x.max((1, 2))),
        ("avg+max", "concat", lambda x: np.concatenate([x.mean((1, 2)), x.max((1, 2))], -1)),
        ("avg+max", "sum", lambda x: x.mean((1, 2)) + x.max((1, 2))),
    ],
)
def test_global_pool_matches_numpy(mode, fusion, expected):
    _close(_apply(GlobalPool(mode=mode, fusion=fusion), {}, X), expected(X.astype(np.float64)))


@pytest.mark.parametrize(("channels", "ratio", "hidden"), [(32, 16, 2), (8, 16, 1)])
def test_sevector_matches_numpy_and_its_gates_start_spread(channels, ratio, hidden):
    v = RNG.standard_normal((4, channels)).astype(np.float32)
    module = SEVector(ratio=ratio)
    variables = _variables(module, v)
    p = variables["params"]
    assert p["reduce"]["kernel"].shape == (channels, hidden)  # max(1, C // ratio)
    gate = scipy.special.expit(_dense(np.maximum(_dense(v, p["reduce"]), 0), p["expand"]))
    _close(_apply(module, variables, v), v * gate)
    # Zero biases (the module's initial ones) do not make the gates one half: the weights spread them.
    p = jax.tree.map(np.copy, p)
    p["reduce"]["bias"][:] = 0
    p["expand"]["bias"][:] = 0
    zero_bias_gate = scipy.special.expit(_dense(np.maximum(_dense(v, p["reduce"]), 0), p["expand"]))
    assert zero_bias_gate.std() > 0.05


def test_spatial_encoding_matches_numpy():
    branches = ((3, 1), (7, 1), (3, 2))
    module = SpatialEncoding(branches=branches, impl="fast")
    variables = _variables(module, X)
    p = variables["params"]
    h = _gelu(_dense(X, p["proj_in"]))
    h = sum(_depthwise(h, p[f"dw{k}_d{d}"], d) for k, d in branches)
    _close(_apply(module, variables, X), _dense(h, p["proj_out"]))


def test_linear_attention_ffn_conv_gate_matches_numpy():
    module = LinearAttentionFFN(ratio=2.0, kernel=5, attention="conv", head_dim=8, impl="fast")
    variables = _variables(module, X)
    p = variables["params"]
    a = _depthwise(_dense(X, p["gate"]), p["gate_dw"])
    expected = _dense(_gelu(a) * _dense(X, p["value"]), p["proj_out"])
    _close(_apply(module, variables, X), expected)


def test_linear_attention_ffn_relu_linear_matches_quadratic_attention():
    """The O(N) form against softmax-free attention computed the O(N^2) way, per image and head."""
    module = LinearAttentionFFN(ratio=2.0, kernel=5, attention="relu_linear", head_dim=4, impl="fast")
    variables = _variables(module, X)
    p = variables["params"]
    b, h, w, c = X.shape
    hidden, heads = 2 * c, 2 * c // 4
    q, k = np.split(np.maximum(_dense(X, p["qk"]), 0), 2, axis=-1)
    a = _dense(X, p["gate"])
    attended = np.zeros((b, h * w, hidden))
    for n in range(b):
        for head in range(heads):
            cols = slice(4 * head, 4 * head + 4)
            qh, kh, ah = (t[n].reshape(h * w, hidden)[:, cols] for t in (q, k, a))
            weights = qh @ kh.T  # (N, N), non-negative
            attended[n, :, cols] = weights @ ah / (weights.sum(1, keepdims=True) + 1e-6)
    expected = _dense(_gelu(attended.reshape(b, h, w, hidden)) * _dense(X, p["value"]), p["proj_out"])
    _close(_apply(module, variables, X), expected)


def test_smooth_ffn_matches_numpy():
    module = SmoothFFN(ratio=4.0, impl="fast")
    variables = _variables(module, X)
    p = variables["params"]
    h = _dense(X, p["fc1"])
    expected = _dense(_gelu(h + _depthwise(h, p["dw"])), p["fc2"])
    _close(_apply(module, variables, X), expected)
