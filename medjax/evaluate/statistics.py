"""Statistics that judge a trained classifier: bootstrap intervals, decision thresholds, calibration.

Pure numpy / scikit-learn functions of labels and predicted probabilities, so they are tested against
hand-computed values and reused by notebooks; :mod:`medjax.tasks.classification` feeds them a run's
predictions.

Conventions (medjax's, stated once here):
  * Binary problems score an example by ``probs[:, 1]``: class 1 is the positive (disease) class.
  * A threshold ``t`` predicts positive when ``score >= t`` (scikit-learn's ``roc_curve`` convention), and
    thresholds are observed validation scores, so they are applied to test unchanged.
  * Intervals are 95 % percentile bootstrap intervals over examples, **stratified by class** by default:
    each resample draws, with replacement, as many examples of every class as the split holds. The
    evaluation splits are fixed collections whose class mix was set when the dataset was assembled (often
    balanced on purpose), so the prevalence is not a sampling outcome to vary; stratifying also keeps
    every class in every resample, so AUC stays defined. This is the default of pROC's ``ci.auc``
    (``boot.stratified=TRUE``). ``stratified=False`` resamples examples freely; resamples where a metric
    is undefined (AUC / PR-AUC with a class missing) are then skipped and counted.
"""

import math
from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm

from medjax.metrics import auc, classification_metrics, one_vs_rest_mean

# The metrics that get a bootstrap interval; 'f1' is macro F1, 'pr_auc' is average precision.
INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "auc", "pr_auc", "f1")


def average_precision(*, labels: np.ndarray, probs: np.ndarray) -> float:
    """PR-AUC as average precision, ``sum_n (R_n - R_{n-1}) P_n`` (no trapezoids, which overestimate).

    Binary: of ``probs[:, 1]``. Several classes: macro mean of one-vs-rest APs over the classes present in
    ``labels`` (as :mod:`medjax.metrics` averages AUC). NaN when fewer than two classes are present.
    """
    return one_vs_rest_mean(skm.average_precision_score, np.asarray(labels), np.asarray(probs))


def summary_metrics(*, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The :data:`INTERVAL_METRICS` of one sample, as :func:`classification_metrics` defines them.

    A lean re-implementation for the bootstrap loop (a third of the time per resample): accuracy, balanced
    accuracy and macro F1 from a ``bincount`` confusion matrix, AUC and PR-AUC from scikit-learn. Tests pin
    it to :func:`classification_metrics`, which gives the reported point estimates.
    """
    labels, probs = np.asarray(labels).astype(np.int64), np.asarray(probs)
    num_classes = probs.shape[1]
    confusion = np.bincount(
        labels * num_classes + probs.argmax(axis=1), minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)
    tp, support, predicted = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    f1_denominator = support + predicted
    f1 = np.divide(2 * tp, f1_denominator, out=np.zeros(num_classes), where=f1_denominator > 0)
    return {
        "accuracy": float(tp.sum() / len(labels)),
        "balanced_accuracy": float(np.mean(tp[support > 0] / support[support > 0])),
        "auc": auc(labels, probs),
        "pr_auc": one_vs_rest_mean(skm.average_precision_score, labels, probs),
        "f1": float(f1.mean()),  # Macro over all classes, 0 for a class never seen nor predicted.
    }


def bootstrap_indices(
    labels: np.ndarray, *, num_samples: int, seed: int, stratified: bool = True
) -> np.ndarray:
    """``(num_samples, N)`` example indices of the resamples; the same ``seed`` gives the same array."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if not stratified:
        return rng.integers(0, len(labels), size=(num_samples, len(labels)))
    columns = []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        columns.append(members[rng.integers(0, len(members), size=(num_samples, len(members)))])
    return np.concatenate(columns, axis=1)


def bootstrap_intervals(
    *,
    labels: np.ndarray,
    probs: np.ndarray,
    num_samples: int,
    seed: int,
    stratified: bool = True,
    confidence: float = 0.95,
) -> dict[str, dict]:
    """Point estimate and percentile bootstrap interval of each of :data:`INTERVAL_METRICS`.

    Returns:
      ``{metric: {'value', 'low', 'high', 'resamples', 'skipped'}}``; ``resamples`` counts the resamples
      behind the interval, ``skipped`` those where the metric was undefined (NaN). ``low``/``high`` are
      NaN when no resample was usable.
    """
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, np.float64)
    point = classification_metrics(labels=labels, probs=probs)
    point["pr_auc"] = average_precision(labels=labels, probs=probs)
    draws = {k: [] for k in INTERVAL_METRICS}
    for idx in bootstrap_indices(labels, num_samples=num_samples, seed=seed, stratified=stratified):
        for k, v in summary_metrics(labels=labels[idx], probs=probs[idx]).items():
            draws[k].append(v)
    return {k: percentile_interval(point[k], values, confidence=confidence) for k, values in draws.items()}


def percentile_interval(value: float, draws: Sequence[float], *, confidence: float = 0.95) -> dict:
    """``{'value', 'low', 'high', 'resamples', 'skipped'}``: the point estimate ``value`` and the percentile
    interval of the bootstrap ``draws``, leaving out (and counting as ``skipped``) the NaN ones; ``low`` and
    ``high`` are NaN when no draw is usable."""
    draws = np.asarray(draws, np.float64)
    usable = draws[~np.isnan(draws)]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(usable, [tail, 100 - tail]) if len(usable) else (math.nan, math.nan)
    return {
        "value": float(value),
        "low": float(low),
        "high": float(high),
        "resamples": len(usable),
        "skipped": int(len(draws) - len(usable)),
    }


def youden_threshold(*, labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1 (ties: the highest threshold).

    Raises:
      ValueError: when ``labels`` lacks one of the two classes (J is undefined).
    """
    fpr, tpr, thresholds = _roc(labels, scores)
    return float(thresholds[np.argmax(tpr - fpr)])


def threshold_for_sensitivity(*, labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity on ``labels`` reaches ``target`` (so the best specificity)."""
    _, tpr, thresholds = _roc(labels, scores)
    return float(thresholds[np.argmax(tpr >= target)])  # tpr ends at 1, so some entry qualifies.


def _roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if len(np.unique(labels)) != 2:
        raise ValueError("A decision threshold needs both classes among the labels.")
    fpr, tpr, thresholds = skm.roc_curve(labels == 1, scores, drop_intermediate=False)
    return fpr[1:], tpr[1:], thresholds[1:]  # The first point (threshold inf) predicts nobody positive.


def operating_point(*, labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Sensitivity, specificity, PPV, NPV and ``[[TN, FP], [FN, TP]]`` when ``score >= threshold``."""
    labels = np.asarray(labels) == 1
    predicted = np.asarray(scores) >= threshold
    tp, fn = int(np.sum(predicted & labels)), int(np.sum(~predicted & labels))
    fp, tn = int(np.sum(predicted & ~labels)), int(np.sum(~predicted & ~labels))

    def ratio(a: int, b: int) -> float:
        return a / (a + b) if a + b else math.nan

    return {
        "threshold": float(threshold),
        "sensitivity": ratio(tp, fn),
        "specificity": ratio(tn, fp),
        "ppv": ratio(tp, fp),
        "npv": ratio(tn, fn),
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def calibration(*, labels: np.ndarray, probs: np.ndarray, num_bins: int) -> dict:
    """Expected calibration error of the top-class confidence, with the bins of a reliability diagram.

    Confidence ``c = max_k probs[:, k]`` goes into equal-width bins ``((b-1)/B, b/B]`` (the first also
    takes 0); ``ECE = sum_b n_b / N * |accuracy_b - mean confidence_b|`` (Guo et al., 2017).

    Returns:
      ``{'ece', 'num_bins', 'bins': [{'lower', 'upper', 'count', 'confidence', 'accuracy'}, ...]}`` with
      every bin listed (NaN means for empty ones).
    """
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    which = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    bins, ece = [], 0.0
    for b in range(num_bins):
        members = which == b
        count = int(members.sum())
        conf = float(confidence[members].mean()) if count else math.nan
        acc = float(correct[members].mean()) if count else math.nan
        if count:
            ece += count / len(confidence) * abs(acc - conf)
        bins.append(
            {
                "lower": b / num_bins,
                "upper": (b + 1) / num_bins,
                "count": count,
                "confidence": conf,
                "accuracy": acc,
            }
        )
    return {"ece": float(ece), "num_bins": num_bins, "bins": bins}


def per_class_report(*, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """scikit-learn's ``classification_report`` (argmax predictions) as a dict keyed by class name."""
    return skm.classification_report(
        labels,
        np.asarray(probs).argmax(axis=1),
        labels=list(range(len(class_names))),
        target_names=list(class_names),
        output_dict=True,
        zero_division=0,
    )
