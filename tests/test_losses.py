"""Loss terms against hand-computed numpy values, and their composition from a config."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import losses

LOGITS = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -1.0, 0.0]], np.float32)
LABELS = np.array([0, 1, 2, 1])
FEATURES = np.array([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0], [2.0, 0.0]], np.float32)


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_cross_entropy_matches_numpy():
    expected = -_log_softmax(LOGITS)[np.arange(4), LABELS]
    got = losses.cross_entropy(logits=LOGITS, labels=LABELS, reduction=False)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(losses.cross_entropy(logits=LOGITS, labels=LABELS), expected.mean(), rtol=1e-6)


def test_cross_entropy_label_smoothing_and_class_weights():
    s = 0.3
    targets = (1 - s) * np.eye(3)[LABELS] + s / 3
    expected = -(targets * _log_softmax(LOGITS)).sum(axis=1) * np.array([1.0, 2.0, 0.5])[LABELS]
    got = losses.cross_entropy(
        logits=LOGITS, labels=LABELS, label_smoothing=s, class_weights=[1.0, 2.0, 0.5], reduction=False
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_focal_reduces_to_cross_entropy_at_gamma_zero_and_matches_formula():
    ce = losses.cross_entropy(logits=LOGITS, labels=LABELS, reduction=False)
    np.testing.assert_allclose(
        losses.focal(logits=LOGITS, labels=LABELS, gamma=0.0, reduction=False), ce, rtol=1e-6
    )
    p = np.exp(_log_softmax(LOGITS))[np.arange(4), LABELS]
    expected = -((1 - p) ** 2) * np.log(p)
    np.testing.assert_allclose(
        losses.focal(logits=LOGITS, labels=LABELS, reduction=False), expected, rtol=1e-5
    )


def test_feature_smoothing_hand_computed():
    # Class 0: one example -> 0. Class 1: features (0,2) and (2,0), mean (1,1), each at squared distance 2.
    # Class 2: one example -> 0. Mean over the 4 examples: (0 + 2 + 0 + 2) / 4 = 1.
    aux = {"features": FEATURES}
    got = losses.feature_smoothing(logits=LOGITS, labels=LABELS, aux=aux, reduction=False)
    np.testing.assert_allclose(got, [0.0, 2.0, 0.0, 2.0], atol=1e-6)
    assert float(losses.feature_smoothing(logits=LOGITS, labels=LABELS, aux=aux)) == pytest.approx(1.0)


def test_feature_smoothing_single_class_batch_is_variance():
    feats = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    labels = np.zeros(6, np.int64)
    expected = ((feats - feats.mean(0)) ** 2).sum(1).mean()
    got = losses.feature_smoothing(
        logits=np.zeros((6, 3), np.float32), labels=labels, aux={"features": feats}
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_feature_smoothing_ignores_masked_examples_in_class_means():
    aux = {"features": FEATURES}
    weights = np.array([1.0, 1.0, 1.0, 0.0], np.float32)  # Drop the second class-1 example.
    got = losses.feature_smoothing(logits=LOGITS, labels=LABELS, aux=aux, weights=weights, reduction=False)
    np.testing.assert_allclose(got, [0.0, 0.0, 0.0, 0.0], atol=1e-6)


def test_feature_smoothing_normalized_and_gradient():
    aux = {"features": FEATURES}
    got = losses.feature_smoothing(logits=LOGITS, labels=LABELS, aux=aux, normalize=True, reduction=False)
    unit = FEATURES / np.linalg.norm(FEATURES, axis=1, keepdims=True)
    mean1 = (unit[1] + unit[3]) / 2
    np.testing.assert_allclose(got[1], ((unit[1] - mean1) ** 2).sum(), rtol=1e-5)
    # d/df_i of sum_j ||f_j - mu||^2 is 2 (f_i - mu): the mean's own gradient cancels.
    grad = jax.grad(
        lambda f: 4 * losses.feature_smoothing(logits=LOGITS, labels=LABELS, aux={"features": f})
    )(jnp.asarray(FEATURES))
    np.testing.assert_allclose(grad[1], 2 * (FEATURES[1] - [1.0, 1.0]), rtol=1e-5)
    np.testing.assert_allclose(grad[0], 0.0, atol=1e-6)
    chex.assert_tree_all_finite(grad)


def test_make_loss_fn_composes_weights_and_reports_terms():
    cfg = {"cross_entropy": {"weight": 1.0}, "feature_smoothing": {"weight": 0.1}}
    loss_fn = losses.make_loss_fn(cfg)
    total, terms = loss_fn(jnp.asarray(LOGITS), jnp.asarray(LABELS), {"features": jnp.asarray(FEATURES)})
    ce = float(losses.cross_entropy(logits=LOGITS, labels=LABELS))
    assert set(terms) == {"cross_entropy", "feature_smoothing"}
    np.testing.assert_allclose(terms["feature_smoothing"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(total, ce + 0.1, rtol=1e-6)


def test_make_loss_fn_weighted_mean_over_mask():
    loss_fn = losses.make_loss_fn({"cross_entropy": {"weight": 1.0}})
    weights = jnp.array([1.0, 1.0, 0.0, 0.0])
    total, _ = loss_fn(jnp.asarray(LOGITS), jnp.asarray(LABELS), {}, weights)
    per_example = losses.cross_entropy(logits=LOGITS, labels=LABELS, reduction=False)
    np.testing.assert_allclose(total, per_example[:2].mean(), rtol=1e-6)


def test_balanced_class_weights_and_config_resolution():
    assert losses.balanced_class_weights([30, 10]) == pytest.approx([40 / 60, 40 / 20])
    loss_fn = losses.make_loss_fn(
        {"cross_entropy": {"weight": 1.0, "class_weights": "balanced"}}, class_counts=[1, 1, 2]
    )
    total, _ = loss_fn(jnp.asarray(LOGITS), jnp.asarray(LABELS), {})
    expected = losses.cross_entropy(logits=LOGITS, labels=LABELS, class_weights=[4 / 3, 4 / 3, 2 / 3])
    np.testing.assert_allclose(total, expected, rtol=1e-6)


def test_custom_term_from_outside_the_package():
    def logit_norm(*, logits, labels, aux, reduction=True, scale=1.0):
        per_example = scale * jnp.sum(logits**2, axis=-1)
        return per_example.mean() if reduction else per_example

    loss_fn = losses.make_loss_fn(
        {"logit_norm": {"weight": 0.5, "scale": 2.0}}, extra_terms={"logit_norm": logit_norm}
    )
    total, terms = loss_fn(jnp.asarray(LOGITS), jnp.asarray(LABELS), {})
    np.testing.assert_allclose(terms["logit_norm"], 2.0 * (LOGITS**2).sum(1).mean(), rtol=1e-6)
    np.testing.assert_allclose(total, 0.5 * terms["logit_norm"], rtol=1e-6)


def test_unknown_term_and_missing_weight_are_clear_errors():
    with pytest.raises(ValueError, match=r"Unknown loss term 'crossentropy'.*cross_entropy"):
        losses.make_loss_fn({"crossentropy": {"weight": 1.0}})
    with pytest.raises(ValueError, match="needs a 'weight'"):
        losses.make_loss_fn({"focal": {"gamma": 2.0}})
    with pytest.raises(ValueError, match="label counts"):
        losses.make_loss_fn({"cross_entropy": {"weight": 1.0, "class_weights": "balanced"}})
