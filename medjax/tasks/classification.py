"""Classification: one label per image, predicted as class probabilities.

What this task owns (the interface is in :mod:`medjax.tasks`):

* training: cross-entropy by default; accuracy beside the loss at every step; validation metrics from
  the gathered logits (:func:`medjax.metrics.classification_metrics`, softmax in float64);
* evaluation (``python -m medjax.evaluate``): an ensemble is the mean of its members' class
  probabilities (soft voting, MONAI's ``MeanEnsemble``); each split gets bootstrap intervals,
  calibration, a per-class report, figures and ``predictions_<role>.csv``; binary tasks also get
  decision thresholds chosen on validation and applied unchanged to the other splits
  (:mod:`medjax.evaluate.statistics` states the conventions).
"""

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from medjax import metrics
from medjax.evaluate import figures, statistics
from medjax.evaluate.markdown import fmt, table


def default_loss() -> dict:
    return {"cross_entropy": {"weight": 1.0, "label_smoothing": 0.0}}


def step_metrics(logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
    return {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


def eval_outputs(logits: jax.Array, aux: dict, batch: dict) -> dict[str, jax.Array]:
    del aux, batch  # Classification is judged on the logits alone.
    return {"logits": logits}


# The scalars validation_metrics gives, plus the loss the loop adds: what a run may select its best
# checkpoint or stop early on (sensitivity and specificity exist for 2 classes).
VALIDATION_METRICS = (
    "loss",
    "accuracy",
    "balanced_accuracy",
    "auc",
    "precision",
    "recall",
    "f1",
    "sensitivity",
    "specificity",
)


def validation_metrics(predictions: dict, class_names: Sequence[str]) -> dict:
    """Metrics of gathered ``{'label', 'logits'}`` (see :func:`medjax.metrics.classification_metrics`)."""
    probs = metrics.probabilities(predictions["logits"])
    return metrics.classification_metrics(labels=predictions["label"], probs=probs, class_names=class_names)


def headline(m: dict) -> str:
    return f"accuracy {m['accuracy']:.4f} auc {m['auc']:.4f}"


def ensemble(member_predictions: Sequence[dict]) -> dict:
    """``{'label', 'probs'}``: the mean of the members' class probabilities (one member: its own)."""
    probs = [metrics.probabilities(p["logits"]) for p in member_predictions]
    return {"label": member_predictions[0]["label"].astype(np.int64), "probs": np.mean(probs, axis=0)}


def judge(predictions: dict[str, dict], *, out: Path, class_names: Sequence[str], settings: dict) -> dict:
    """The evaluation of ``{role: {'split', 'label', 'probs'}}``: thresholds (binary) and each split's
    metrics, calibration, figures and per-example CSV, written into ``out``."""
    report: dict = {"class_names": list(class_names)}
    if len(class_names) == 2:
        report["thresholds"] = _thresholds(predictions, target=settings["target_sensitivity"])
    report["splits"] = {
        role: {"split": p["split"]}
        | _judge_split(out, role, labels=p["label"], probs=p["probs"], settings=settings, report=report)
        for role, p in predictions.items()
    }
    return report


def _thresholds(predictions: dict[str, dict], *, target: float) -> dict:
    """Youden and target-sensitivity thresholds chosen on validation, evaluated on every split."""
    if "validation" not in predictions:
        return {"note": "Not chosen: the validation split was not among --splits."}
    labels, scores = predictions["validation"]["label"], predictions["validation"]["probs"][:, 1]
    chosen = {
        "youden": statistics.youden_threshold(labels=labels, scores=scores),
        f"sensitivity>={target:g}": statistics.threshold_for_sensitivity(
            labels=labels, scores=scores, target=target
        ),
    }
    rules = {}
    for rule, threshold in chosen.items():
        rules[rule] = {"threshold": threshold}
        for role, p in predictions.items():
            rules[rule][role] = statistics.operating_point(
                labels=p["label"], scores=p["probs"][:, 1], threshold=threshold
            )
    return {"chosen_on": "validation", "rules": rules}


def _judge_split(out: Path, role: str, *, labels, probs, settings: dict, report: dict) -> dict:
    """Metrics with intervals, calibration, per-class report and figures of one split's predictions."""
    names = report["class_names"]
    points = {rule: ops[role] for rule, ops in report.get("thresholds", {}).get("rules", {}).items()}
    calibration = statistics.calibration(labels=labels, probs=probs, num_bins=settings["calibration_bins"])
    confusion = metrics.classification_metrics(labels=labels, probs=probs)["confusion_matrix"]
    _write_predictions(out / f"predictions_{role}.csv", labels=labels, probs=probs, class_names=names)
    return {
        "num_examples": len(labels),
        "label_counts": np.bincount(labels, minlength=len(names)).tolist(),
        "metrics": statistics.bootstrap_intervals(
            labels=labels,
            probs=probs,
            num_samples=settings["bootstrap_samples"],
            seed=settings["seed"],
            stratified=settings["stratified"],
        ),
        "confusion_matrix": confusion,
        "calibration": calibration,
        "per_class": statistics.per_class_report(labels=labels, probs=probs, class_names=names),
        "figures": {
            "curves": figures.plot_curves(
                out / f"{role}_curves.png", labels=labels, probs=probs, class_names=names, points=points
            ),
            "confusion": figures.plot_confusion(
                out / f"{role}_confusion.png", confusion=confusion, class_names=names
            ),
            "reliability": figures.plot_reliability(out / f"{role}_reliability.png", calibration=calibration),
        },
    }


def _write_predictions(
    path: Path, *, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> None:
    """One CSV row per example (position in the split, label, probabilities at full float64 precision)."""
    header = ",".join(["index", "label", *(f"p_{name}" for name in class_names)])
    rows = np.column_stack([np.arange(len(labels)), labels, probs])
    np.savetxt(
        path, rows, delimiter=",", header=header, comments="", fmt=["%d", "%d"] + ["%.17g"] * len(class_names)
    )


def report_lines(report: dict) -> list[str]:
    """The body of ``report.md``: per split, metrics with intervals, calibration, figures, per class;
    then the decision thresholds."""
    s = report["settings"]
    lines = [
        f"Classes: {', '.join(report['class_names'])}. Intervals: 95 % percentile bootstrap, "
        f"{s['bootstrap_samples']} resamples, seed {s['seed']}, "
        f"{'stratified by class' if s['stratified'] else 'unstratified'}. They measure the uncertainty due "
        "to the finite evaluation set, not training randomness (another seed trains another model).",
    ]
    for role, split in report["splits"].items():
        lines += ["", f"## {role} (`{split['split']}`, {split['num_examples']} examples)", ""]
        rows = [
            [name, fmt(m["value"]), f"{fmt(m['low'])} to {fmt(m['high'])}", m["skipped"]]
            for name, m in split["metrics"].items()
        ]
        lines += table(["metric", "value", "95 % interval", "resamples skipped"], rows)
        calibration = split["calibration"]
        lines += [
            "",
            f"Expected calibration error ({calibration['num_bins']} equal-width bins of the top-class "
            f"probability): {fmt(calibration['ece'])}.",
            "",
        ]
        lines += [f"![{role} {kind}]({file})" for kind, file in split["figures"].items()]
        lines += ["", "Per class (argmax):", ""]
        per_class = [
            [name, fmt(r["precision"]), fmt(r["recall"]), fmt(r["f1-score"]), int(r["support"])]
            for name, r in split["per_class"].items()
            if name in report["class_names"]
        ]
        lines += table(["class", "precision", "recall", "F1", "support"], per_class)
    if "thresholds" in report:
        lines += _threshold_lines(report["thresholds"])
    return lines


def _threshold_lines(thresholds: dict) -> list[str]:
    lines = ["", "## Decision thresholds (chosen on validation, applied unchanged to test)", ""]
    if "note" in thresholds:
        return [*lines, thresholds["note"]]
    rows = [
        [
            rule,
            f"{entry['threshold']:.6g}",
            role,
            *(fmt(op[k]) for k in ("sensitivity", "specificity", "ppv", "npv")),
        ]
        for rule, entry in thresholds["rules"].items()
        for role, op in entry.items()
        if role != "threshold"
    ]
    head = ["rule", "threshold", "split", "sensitivity", "specificity", "PPV", "NPV"]
    return [
        *lines,
        *table(head, rows),
        "",
        "A score (probability of the positive class) >= threshold is positive.",
    ]
