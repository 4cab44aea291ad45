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


def test_center_loss_and_wen_update_hand_computed():
    centers = np.array([[0.0, 0.0], [1.0, 1.0], [4.0, 4.0]], np.float32)
    aux = {"features": FEATURES}
    # Squared distances to the own class centre:
    # (1,0)-(0,0): 1; (0,2)-(1,1): 2; (5,5)-(4,4): 2; (2,0)-(1,1): 2.
    got = losses.center_loss(
        logits=LOGITS, labels=LABELS, aux=aux, state={"centers": centers}, reduction=False
    )
    np.testing.assert_allclose(got, [1.0, 2.0, 2.0, 2.0], atol=1e-6)
    # Wen et al.: c_k -= a * sum_i (c_k - f_i) / (1 + n_k).
    # Class 1: n=2, sum (c - f) = (1,-1) + (-1,1) = 0, unchanged.
    # Class 0: (0,0) - 0.5 * ((0,0) - (1,0)) / 2 = (0.25, 0).
    # Class 2: (4,4) - 0.5 * (-1,-1) / 2 = (4.25, 4.25).
    new = losses.update_centers(
        {"centers": centers}, labels=LABELS, aux=aux, weights=np.ones(4, np.float32), update_rate=0.5
    )
    np.testing.assert_allclose(new["centers"], [[0.25, 0.0], [1.0, 1.0], [4.25, 4.25]], atol=1e-6)


def test_update_centers_leaves_absent_and_masked_classes_alone():
    centers = np.array([[0.0, 0.0], [1.0, 1.0], [4.0, 4.0]], np.float32)
    weights = np.array([0.0, 1.0, 0.0, 1.0], np.float32)  # Classes 0 and 2 only appear masked.
    new = losses.update_centers(
        {"centers": centers}, labels=LABELS, aux={"features": FEATURES}, weights=weights
    )
    np.testing.assert_array_equal(np.asarray(new["centers"])[[0, 2]], centers[[0, 2]])


def test_center_loss_gradient_reaches_features_not_centers():
    centers = jnp.asarray([[0.0, 0.0], [1.0, 1.0], [4.0, 4.0]])
    grad_f, grad_c = jax.grad(
        lambda f, c: losses.center_loss(
            logits=LOGITS, labels=LABELS, aux={"features": f}, state={"centers": c}
        ),
        argnums=(0, 1),
    )(jnp.asarray(FEATURES), centers)
    np.testing.assert_allclose(grad_f, 2 * (FEATURES - np.asarray(centers)[LABELS]) / 4, atol=1e-6)
    np.testing.assert_array_equal(grad_c, 0.0)


def _supcon_reference(features, labels, temperature, valid):
    """Khosla et al.'s L_out written as explicit loops (independent of the vectorised version)."""
    z = features / np.linalg.norm(features, axis=1, keepdims=True)
    out = np.zeros(len(labels))
    for i in range(len(labels)):
        if not valid[i]:
            continue
        others = [a for a in range(len(labels)) if a != i and valid[a]]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        log_denominator = np.log(sum(np.exp(z[i] @ z[a] / temperature) for a in others))
        out[i] = -np.mean([z[i] @ z[p] / temperature - log_denominator for p in positives])
    return out


def test_supervised_contrastive_matches_loop_reference_with_padding():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(7, 5)).astype(np.float32)
    labels = np.array([0, 1, 0, 2, 1, 1, 0])
    weights = np.array([1, 1, 1, 1, 1, 1, 0], np.float32)
    got = losses.supervised_contrastive(
        logits=np.zeros((7, 3)),
        labels=labels,
        aux={"features": feats},
        weights=weights,
        temperature=0.5,
        reduction=False,
    )
    expected = _supcon_reference(feats, labels, 0.5, weights > 0)
    assert expected[3] == 0.0  # Class 2 has no positive: it contributes nothing.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_dice_hand_computed_and_perfect_prediction():
    # One 1x2 image, 2 classes; probabilities for class 1 are 0.5 and 1.0 (logits built to give them).
    logits = np.log(np.array([[[[0.5, 0.5], [1e-12, 1.0]]]], np.float32))
    labels = np.array([[[1, 1]]])
    # Foreground: intersection 1.5, |P| = 1.5, |G| = 2 -> dice 3 / 3.5; loss 1 - 6/7 = 1/7.
    np.testing.assert_allclose(losses.dice(logits=logits, labels=labels, smooth=0.0), 1 / 7, rtol=1e-5)
    perfect = np.where(np.eye(3)[np.array([[[0, 2], [1, 1]]])] > 0, 30.0, -30.0).astype(np.float32)
    np.testing.assert_allclose(
        losses.dice(logits=perfect, labels=np.array([[[0, 2], [1, 1]]]), include_background=True),
        0.0,
        atol=1e-6,
    )


def test_batch_dice_pools_the_batch_so_an_empty_image_is_not_scored_alone():
    # Image 0: foreground probabilities 0.5, 1.0 on two foreground pixels; image 1: no foreground, one
    # false-positive pixel at 0.5. Pooled: intersection 1.5, |P| 2.0, |G| 2 -> loss 1 - 3/4 = 1/4.
    # Per image: 1/7 and 1 (the empty image scores 0 Dice), mean 4/7.
    p = np.array([[[0.5, 1.0]], [[0.5, 0.0]]], np.float32)
    logits = np.log(np.stack([1.0 - p, p], axis=-1) + 1e-12)
    labels = np.array([[[1, 1]], [[0, 0]]])
    pooled = losses.dice(logits=logits, labels=labels, smooth=0.0, batch=True)
    np.testing.assert_allclose(pooled, 1 / 4, rtol=1e-5)
    np.testing.assert_allclose(losses.dice(logits=logits, labels=labels, smooth=0.0), 4 / 7, rtol=1e-5)
    per_example = losses.dice(logits=logits, labels=labels, smooth=0.0, batch=True, reduction=False)
    np.testing.assert_allclose(
        per_example, [1 / 4, 1 / 4], rtol=1e-5
    )  # Any weighted mean is the pooled loss.
    padded = losses.dice(logits=logits, labels=labels, smooth=0.0, batch=True, weights=np.array([1.0, 0.0]))
    np.testing.assert_allclose(padded, 1 / 7, rtol=1e-5)  # Weight 0 (padding) leaves image 1 out.
    composite = losses.make_loss_fn({"dice": {"weight": 1.0, "batch": True, "smooth": 0.0}})
    np.testing.assert_allclose(composite(logits, labels, None)[0], 1 / 4, rtol=1e-5)


def test_composite_loss_warmup_and_state():
    loss_fn = losses.make_loss_fn(
        {
            "cross_entropy": {"weight": 1.0},
            "center_loss": {"weight": 0.5, "warmup_steps": 10, "update_rate": 1.0},
        }
    )
    state = loss_fn.init_state(num_classes=3, feature_dim=2)
    chex.assert_trees_all_equal(state, {"center_loss": {"centers": np.zeros((3, 2), np.float32)}})
    aux = {"features": jnp.asarray(FEATURES)}
    ce = losses.cross_entropy(logits=LOGITS, labels=LABELS)
    center = float(np.mean(np.sum(FEATURES**2, axis=1)))  # Distance to the zero centres.
    for step, factor in ((0, 0.0), (4, 0.4), (10, 1.0), (25, 1.0), (None, 1.0)):
        total, terms = loss_fn(jnp.asarray(LOGITS), jnp.asarray(LABELS), aux, state=state, step=step)
        np.testing.assert_allclose(terms["center_loss"], center, rtol=1e-6)
        np.testing.assert_allclose(total, ce + 0.5 * factor * center, rtol=1e-6)
    # update_rate 1 moves a centre to (n_k * f_mean) / (1 + n_k) from zero.
    new = loss_fn.update_state(state, labels=jnp.asarray(LABELS), aux=aux)
    np.testing.assert_allclose(new["center_loss"]["centers"][1], [2 / 3, 2 / 3], atol=1e-6)


# --- segmentation shapes: (B, H, W, K) logits, (B, H, W) labels, per-pixel weights ------------------

SEG_LOGITS = np.random.default_rng(3).normal(size=(2, 2, 3, 3)).astype(np.float32)
SEG_LABELS = np.array([[[0, 1, 2], [2, 2, 0]], [[1, 1, 0], [0, 2, 1]]])
FOV = np.array([[[1, 1, 0], [1, 0, 1]], [[1, 1, 1], [1, 1, 1]]], np.float32)


def _pixel_nll(logits, labels):
    flat = logits.reshape(-1, logits.shape[-1])
    return -_log_softmax(flat)[np.arange(flat.shape[0]), labels.reshape(-1)].reshape(labels.shape)


def test_segmentation_cross_entropy_and_focal_are_per_image_means_over_valid_pixels():
    nll = _pixel_nll(SEG_LOGITS, SEG_LABELS)
    got = losses.cross_entropy(logits=SEG_LOGITS, labels=SEG_LABELS, reduction=False)
    np.testing.assert_allclose(got, nll.reshape(2, -1).mean(axis=1), rtol=1e-6)
    # Image 0 keeps 4 of its 6 pixels; image 1 all of them.
    expected = [nll[0][FOV[0] > 0].mean(), nll[1].mean()]
    got = losses.cross_entropy(logits=SEG_LOGITS, labels=SEG_LABELS, pixel_weights=FOV, reduction=False)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    weighted = losses.cross_entropy(
        logits=SEG_LOGITS, labels=SEG_LABELS, class_weights=[1.0, 2.0, 0.5], pixel_weights=FOV
    )
    per_pixel = nll * np.array([1.0, 2.0, 0.5])[SEG_LABELS]
    expected = np.mean([per_pixel[0][FOV[0] > 0].mean(), per_pixel[1].mean()])
    np.testing.assert_allclose(weighted, expected, rtol=1e-6)
    p = np.exp(-nll)
    got = losses.focal(logits=SEG_LOGITS, labels=SEG_LABELS, pixel_weights=FOV, reduction=False)
    focal = (1 - p) ** 2 * nll
    np.testing.assert_allclose(got, [focal[0][FOV[0] > 0].mean(), focal[1].mean()], rtol=1e-5)


def test_dice_leaves_zero_weight_pixels_out():
    # The hand-computed 1x2 image of the test above plus a third pixel that the weights leave out: 1/7 again.
    logits = np.log(np.array([[[[0.5, 0.5], [1e-12, 1.0], [1e-12, 1.0]]]], np.float32))
    labels = np.array([[[1, 1, 0]]])
    weights = np.array([[[1.0, 1.0, 0.0]]], np.float32)
    got = losses.dice(logits=logits, labels=labels, smooth=0.0, pixel_weights=weights)
    np.testing.assert_allclose(got, 1 / 7, rtol=1e-5)
    assert float(losses.dice(logits=logits, labels=labels, smooth=0.0)) > 0.2  # counted, it hurts
    with pytest.raises(ValueError, match="segmentation logits"):
        losses.dice(logits=LOGITS, labels=LABELS)


def test_composite_segmentation_loss_with_padding_and_field_of_view():
    loss_fn = losses.make_loss_fn({"cross_entropy": {"weight": 1.0}, "dice": {"weight": 0.5}})
    weights = np.array([1.0, 0.0], np.float32)  # the second image is batch padding
    total, terms = loss_fn(SEG_LOGITS, SEG_LABELS, {}, weights, pixel_weights=FOV)
    ce = losses.cross_entropy(logits=SEG_LOGITS[:1], labels=SEG_LABELS[:1], pixel_weights=FOV[:1])
    dice = losses.dice(logits=SEG_LOGITS[:1], labels=SEG_LABELS[:1], pixel_weights=FOV[:1])
    np.testing.assert_allclose(terms["cross_entropy"], ce, rtol=1e-6)
    np.testing.assert_allclose(terms["dice"], dice, rtol=1e-6)
    np.testing.assert_allclose(total, ce + 0.5 * dice, rtol=1e-6)


def test_per_image_terms_refuse_segmentation_labels():
    aux = {"features": np.ones((2, 4), np.float32)}
    for name in ("feature_smoothing", "supervised_contrastive"):
        with pytest.raises(ValueError, match=f"{name}.*one class label per image"):
            losses.TERMS[name](logits=SEG_LOGITS, labels=SEG_LABELS, aux=aux)
    state = {"centers": np.zeros((3, 4), np.float32)}
    with pytest.raises(ValueError, match="center_loss.*one class label per image"):
        losses.center_loss(logits=SEG_LOGITS, labels=SEG_LABELS, aux=aux, state=state)
    loss_fn = losses.make_loss_fn(
        {"mine": {"weight": 1.0}}, extra_terms={"mine": lambda *, logits, labels, aux, reduction: 0.0}
    )
    with pytest.raises(ValueError, match="'mine' cannot leave pixels out"):
        loss_fn(SEG_LOGITS, SEG_LABELS, aux, pixel_weights=FOV)
    with pytest.raises(ValueError, match="pixel_weights apply to segmentation"):
        losses.cross_entropy(logits=LOGITS, labels=LABELS, pixel_weights=np.ones(4))
