"""Tests for the PLoS One 2026 MedNeXt (``medjax.models.mednext_plos``, not DKFZ's 3-D MedNeXt).

Full-size variants are checked with ``jax.eval_shape`` only (no compile); behaviour is checked on a
miniature configuration whose layer scale is 1 and head random, so every branch visibly moves the output.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import get_model, mednext_plos

# Miniature: same block types in every stage, depth 1, layer scale 1 and a random head so that branches,
# drop path and the classifier all visibly affect the outputs.
MINI = {
    "widths": (8, 16, 16, 32),
    "depths": (1, 1, 1, 1),
    "head_dim": 8,
    "layer_scale_init": 1.0,
    "drop_path_rate": 0.5,
    "head_zero_init": False,
    "depthwise_impl": "xla",
}


def _param_count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _abstract_init(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _abstract_apply(model, shape):
    variables = _abstract_init(model, shape)
    return jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)


def block_count(c: int, kind: str) -> int:
    """Parameters of one default block of width ``c`` with FFN ``kind``, from the module docstring."""
    sem = 2 * (c * c + c) + (9 + 49 + 49) * c + 3 * c
    smooth = (c * 4 * c + 4 * c) + (9 * 4 * c + 4 * c) + (4 * c * c + c)
    la = (c * 2 * c + 2 * c) + (49 * 2 * c + 2 * c) + (c * 2 * c + 2 * c) + (2 * c * c + c)
    return 4 * c + 2 * c + sem + {"smooth": smooth, "la": la}[kind]  # 2 LayerNorms, 2 gammas


def encoder_count(widths, depths, ffn, in_ch=3) -> int:
    """Parameter count of the four-stage encoder, written out by hand."""
    total = 16 * in_ch * widths[0] + widths[0] + 2 * widths[0]  # stem conv + LayerNorm
    for s, (c, d) in enumerate(zip(widths, depths, strict=True)):
        if s:
            total += 2 * widths[s - 1] + 4 * widths[s - 1] * c + c  # LayerNorm + 2x2 conv
        total += d * block_count(c, ffn[s])
    return total


def _hand_count(widths, depths, ffn, num_classes, in_ch=3) -> int:
    """Parameter count of the classifier: encoder, head LayerNorm and linear head."""
    head = 2 * widths[-1] + widths[-1] * num_classes + num_classes
    return encoder_count(widths, depths, ffn, in_ch) + head


@pytest.mark.parametrize(
    ("variant", "num_classes", "expected"),
    [
        ("tiny", 1000, 5_610_904),
        ("tiny", 2, 5_226_674),
        ("small", 1000, 13_781_864),
        ("small", 2, 13_269_890),
    ],
)
def test_golden_parameter_counts(variant, num_classes, expected):
    model = get_model("mednext_plos", num_classes=num_classes, variant=variant)
    count = _param_count(_abstract_init(model, (1, 224, 224, 3))["params"])
    widths, depths = model.stage_config()
    assert count == expected == _hand_count(widths, depths, model.ffn, num_classes)


def test_relu_linear_adds_only_query_key_projections():
    conv = _abstract_init(mednext_plos.Model(num_classes=2), (1, 64, 64, 3))["params"]
    lin = _abstract_init(mednext_plos.Model(num_classes=2, attention="relu_linear"), (1, 64, 64, 3))["params"]
    # 'la' blocks (6 at width 192, 2 at 384) gain Dense(C -> 4C) for q, k and lose the 7x7 gate on 2C.
    extra = sum(n * (c * 4 * c + 4 * c - (49 * 2 * c + 2 * c)) for n, c in ((6, 192), (2, 384)))
    assert _param_count(lin) - _param_count(conv) == extra


@pytest.mark.parametrize("size", [28, 64, 224])
@pytest.mark.parametrize("channels", [1, 3])
def test_full_size_shapes(size, channels):
    logits, aux = _abstract_apply(mednext_plos.Model(num_classes=5), (2, size, size, channels))
    assert logits.shape == (2, 5)
    assert set(aux) == {"features", "feature_map", "stage_features"}
    assert aux["features"].shape == (2, 384)
    sides = [-(-size // stride) for stride in (4, 8, 16, 32)]  # ceil mode: 28 -> 7, 4, 2, 1
    widths = (48, 96, 192, 384)
    assert [f.shape for f in aux["stage_features"]] == [
        (2, s, s, c) for s, c in zip(sides, widths, strict=True)
    ]
    assert aux["feature_map"].shape == aux["stage_features"][-1].shape


def test_dual_pooling_concat_doubles_features():
    _, aux = _abstract_apply(mednext_plos.Model(num_classes=2, pooling="avg+max"), (1, 64, 64, 3))
    assert aux["features"].shape == (1, 768)


def test_relu_linear_attention_matches_quadratic_form():
    rng = np.random.default_rng(0)
    q, k = (np.abs(rng.normal(size=(2, 5, 3, 4))) for _ in range(2))
    v = rng.normal(size=(2, 5, 3, 6))
    scores = np.einsum("bihd,bjhd->bhij", q, k)
    expected = np.einsum("bhij,bjhe->bihe", scores / scores.sum(-1, keepdims=True), v)
    got = mednext_plos.relu_linear_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), eps=0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _key(seed: int) -> jax.Array:
    # RngBitGenerator keys: a threefry init graph takes ~40 s to compile on the shared 2-core machine.
    return jax.random.key(seed, impl="unsafe_rbg")


def _init(model, x):
    return jax.jit(lambda key, x: model.init(key, x, train=False))(_key(0), x)


@pytest.fixture(scope="module")
def mini():
    """The miniature model, its variables, a 28x28 grey batch, a jitted forward and a jitted train step."""
    model = mednext_plos.Model(num_classes=3, **MINI)
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    variables = _init(model, x)
    # Traced at most once per input shape (28x28 and 64x64) over the whole module.
    apply = jax.jit(chex.assert_max_traces(lambda v, x: model.apply(v, x, train=False), n=2))

    def loss(params, x, key):
        logits, _ = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), logits

    train_step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return model, variables, x, apply, train_step


def test_forward_on_28_and_64_traces_once_per_shape(mini):
    _, variables, x, apply, _ = mini
    for scale in (1.0, 2.0):
        logits, aux = apply(variables, scale * x)
        assert np.isfinite(logits).all()
        assert logits.shape == (2, 3)
        assert [f.shape[1] for f in aux["stage_features"]] == [7, 4, 2, 1]
        _, aux = apply(variables, jnp.full((1, 64, 64, 1), scale))
        assert [f.shape[1] for f in aux["stage_features"]] == [16, 8, 4, 2]
        assert aux["feature_map"].shape == (1, 2, 2, 32)


def test_drop_path_active_only_in_training(mini):
    _, variables, x, apply, train_step = mini
    a, b = (train_step(variables["params"], x, _key(seed))[0][1] for seed in (0, 1))
    evaluated = apply(variables, x)[0]
    assert not np.allclose(a, b)
    assert not np.allclose(a, evaluated)
    np.testing.assert_array_equal(apply(variables, x)[0], evaluated)


def test_gradient_finite_and_nonzero(mini):
    _, variables, x, _, train_step = mini
    (loss, _), grads = train_step(variables["params"], x, _key(2))
    assert np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert np.abs(grads["encoder"]["stem"]["kernel"]).sum() > 0


def test_fast_and_xla_depthwise_agree(mini):
    _, variables, x, apply, _ = mini
    fast = mednext_plos.Model(num_classes=3, **{**MINI, "depthwise_impl": "fast"})
    logits = jax.jit(lambda v: fast.apply(v, x, train=False))(variables)[0]
    np.testing.assert_allclose(logits, apply(variables, x)[0], rtol=1e-5, atol=1e-5)


def test_relu_linear_init_values_and_forward(mini):
    x = mini[2]
    model = mednext_plos.Model(
        num_classes=3, widths=(8, 16, 16, 32), depths=(1, 1, 1, 1), head_dim=8, attention="relu_linear"
    )
    variables = _init(model, x)
    params = variables["params"]
    np.testing.assert_array_equal(params["head"]["kernel"], 0.0)
    np.testing.assert_allclose(params["encoder"]["stage3_block0"]["gamma1"], 1e-6)
    logits, aux = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
    np.testing.assert_array_equal(logits, 0.0)  # zero-initialised head
    assert np.isfinite(aux["features"]).all() and np.abs(aux["features"]).sum() > 0


def test_bad_config_raises():
    with pytest.raises(ValueError, match="variant"):
        _abstract_init(mednext_plos.Model(num_classes=2, variant="huge"), (1, 32, 32, 3))
    with pytest.raises(ValueError, match="ffn entries"):
        _abstract_init(mednext_plos.Model(num_classes=2, ffn=("smooth",) * 3 + ("mlp",)), (1, 32, 32, 3))
