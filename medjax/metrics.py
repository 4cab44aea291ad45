"""Classification metrics computed on the host from collected labels and probabilities.

Ranking metrics (AUC) need every example at once, so evaluation gathers labels and probabilities
(masked, each example exactly once) and calls :func:`classification_metrics`; scikit-learn does the
arithmetic. Values come back as plain Python floats and lists, ready for JSON.
"""

import math
from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax in float64. A float32 softmax returns exactly 1.0 once the logit margin exceeds ~17, so a
    confident model's positives would tie and AUC would score their ranking as coin flips."""
    logits = np.asarray(logits, np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def classification_metrics(
    *, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str] | None = None
) -> dict:
    """Accuracy, balanced accuracy, AUC-ROC, macro precision/recall/F1, confusion matrix.

    Binary problems (two columns in ``probs``) also get sensitivity (recall of class 1, the positive /
    disease class by medjax's label convention) and specificity (recall of class 0). AUC-ROC is binary on
    ``probs[:, 1]``, or macro one-vs-rest for several classes; it is NaN when ``labels`` holds a single
    class, where it is undefined.

    Args:
      labels: ``(N,)`` integer true classes.
      probs: ``(N, K)`` predicted class probabilities (rows sum to 1).
      class_names: optional names, used in the per-class recall entries.
    """
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    class_ids = list(range(num_classes))
    confusion = skm.confusion_matrix(labels, preds, labels=class_ids)
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        labels, preds, labels=class_ids, average="macro", zero_division=0
    )
    result = {
        "accuracy": float(skm.accuracy_score(labels, preds)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, preds)),
        "auc": auc(labels, probs),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "confusion_matrix": confusion.tolist(),
        "num_examples": int(labels.shape[0]),
    }
    support = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), support, out=np.zeros(num_classes), where=support > 0)
    names = list(class_names) if class_names is not None else [str(i) for i in class_ids]
    result["recall_per_class"] = {name: float(r) for name, r in zip(names, per_class, strict=True)}
    if num_classes == 2:
        result["sensitivity"] = float(per_class[1])
        result["specificity"] = float(per_class[0])
    return result


def one_vs_rest_mean(score_fn, labels: np.ndarray, probs: np.ndarray) -> float:
    """A ranking score (``roc_auc_score``, ``average_precision_score``) of the class probabilities.

    Binary (two columns): of ``probs[:, 1]``. Several classes: the macro mean of one-vs-rest scores over
    the classes present in ``labels`` (undefined for a class with no positives). NaN when fewer than two
    classes are present.
    """
    labels, probs = np.asarray(labels), np.asarray(probs)
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    classes = [1] if probs.shape[1] == 2 else present
    return float(np.mean([score_fn(labels == k, probs[:, k]) for k in classes]))


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """AUC-ROC as :func:`classification_metrics` reports it (see :func:`one_vs_rest_mean`)."""
    return one_vs_rest_mean(skm.roc_auc_score, labels, probs)
