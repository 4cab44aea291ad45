"""Classification metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from medjax.metrics import classification_metrics


def test_binary_metrics_by_hand():
    # labels:  0 0 0 1 1 1 1 1 ; predictions (p1 > 0.5): 0 1 0 1 1 0 1 1
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.3, 0.9, 0.8, 0.4, 0.7, 0.55])
    m = classification_metrics(
        labels=labels, probs=np.stack([1 - p1, p1], 1), class_names=["normal", "lesion"]
    )
    # Confusion [[TN FP] [FN TP]] = [[2 1] [1 4]].
    assert m["confusion_matrix"] == [[2, 1], [1, 4]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(4 / 5)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    # Macro precision: class 0: 2/3, class 1: 4/5.  Macro F1: class 0: 2/3, class 1: 4/5.
    assert m["precision"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # AUC: pairs (pos, neg) ranked correctly. Negatives 0.1, 0.6, 0.3; positives 0.9 0.8 0.4 0.7 0.55.
    # 0.9, 0.8, 0.7 beat all 3 (9); 0.4 beats 0.1 and 0.3 (2); 0.55 beats 0.1 and 0.3 (2): 13 / 15.
    assert m["auc"] == pytest.approx(13 / 15)
    assert m["recall_per_class"] == {"normal": pytest.approx(2 / 3), "lesion": pytest.approx(4 / 5)}
    assert m["num_examples"] == 8


def test_multiclass_metrics_by_hand():
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.1, 0.2, 0.7]])
    m = classification_metrics(labels=labels, probs=probs)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    # One-vs-rest AUCs: class 0: 1.0; class 1: scores 0.7 (pos) vs 0.1, 0.6, 0.2 -> 1.0;
    # class 2: positives 0.3, 0.7 vs negatives 0.1, 0.1 -> 1.0.
    assert m["auc"] == pytest.approx(1.0)
    assert "sensitivity" not in m


def test_auc_is_nan_when_only_one_class_present():
    m = classification_metrics(labels=np.array([1, 1]), probs=np.array([[0.3, 0.7], [0.6, 0.4]]))
    assert math.isnan(m["auc"])
    assert m["sensitivity"] == pytest.approx(0.5)
