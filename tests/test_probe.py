"""medjax/probe.py: the linear probe chooses its regularisation on train alone and scores validation."""

import numpy as np
import pytest

from medjax import probe


def _blobs(rng, n, dim, shift):
    y = np.arange(n) % 2
    x = rng.normal(size=(n, dim))
    x[:, 0] += shift * y
    return x, y


def test_separable_features_score_one_and_noise_about_half():
    rng = np.random.default_rng(0)
    separable = probe.linear_probe_auc(_blobs(rng, 200, 8, 6.0), _blobs(rng, 100, 8, 6.0))
    assert separable["auc"] == pytest.approx(1.0, abs=1e-3) and separable["dim"] == 8
    assert separable["c"] in probe.PROBE_CS
    noise = probe.linear_probe_auc(_blobs(rng, 200, 8, 0.0), _blobs(rng, 2000, 8, 0.0))
    assert abs(noise["auc"] - 0.5) < 0.05


def test_validation_labels_do_not_choose_the_probe():
    """Only the score reads validation: shuffling its labels leaves C alone and moves the AUC."""
    rng = np.random.default_rng(1)
    train, (vx, vy) = _blobs(rng, 120, 16, 1.0), _blobs(rng, 120, 16, 1.0)
    honest = probe.linear_probe_auc(train, (vx, vy))
    shuffled = probe.linear_probe_auc(train, (vx, rng.permutation(vy)))
    assert honest["c"] == shuffled["c"] and honest["auc"] > shuffled["auc"] + 0.1


def test_a_class_with_fewer_images_than_folds_still_probes():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(23, 4))
    y = np.array([1, 0, 1] + [0] * 20)  # Two positives: two folds.
    x[y == 1, 0] += 5.0
    assert probe.linear_probe_auc((x, y), (x, y))["auc"] > 0.9
