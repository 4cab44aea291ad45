"""Figures of a classification evaluation: ROC and PR curves, confusion matrix, reliability diagram.

matplotlib's Agg backend through the object API (no pyplot state, no display needed). Each function
writes one PNG and returns its file name, which ``report.md`` embeds by relative path, so the report
directory can be moved or attached as a whole.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import metrics as skm

DPI = 100


def _save(fig: Figure, path: Path) -> str:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path.name


def plot_curves(
    path: Path, *, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], points: dict
) -> str:
    """ROC and precision-recall curves side by side; binary problems mark the ``points`` (name -> op)."""
    fig = Figure(figsize=(9, 4))
    roc_ax, pr_ax = fig.subplots(1, 2)
    binary = len(class_names) == 2
    for k in [1] if binary else range(len(class_names)):
        positive = np.asarray(labels) == k
        if positive.all() or not positive.any():
            continue  # A curve needs positives and negatives.
        fpr, tpr, _ = skm.roc_curve(positive, probs[:, k])
        precision, recall, _ = skm.precision_recall_curve(positive, probs[:, k])
        name = class_names[k] if not binary else f"{class_names[1]} vs {class_names[0]}"
        roc_ax.plot(fpr, tpr, label=f"{name} (AUC {skm.auc(fpr, tpr):.3f})")
        ap = skm.average_precision_score(positive, probs[:, k])
        pr_ax.plot(recall, precision, drawstyle="steps-post", label=f"{name} (AP {ap:.3f})")
    for name, op in points.items():
        roc_ax.plot(1 - op["specificity"], op["sensitivity"], "o", label=f"{name} (t={op['threshold']:.3f})")
    roc_ax.plot([0, 1], [0, 1], ":", color="grey")
    roc_ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    pr_ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    roc_ax.legend(fontsize=7, loc="lower right")
    pr_ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_confusion(path: Path, *, confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> str:
    """Confusion matrix (rows: true class, columns: predicted), with counts and row percentages."""
    confusion = np.asarray(confusion)
    rows = np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.6 * len(class_names)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(confusion / rows, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(confusion):
        share = n / rows[i, 0]
        ax.text(
            j, i, f"{n}\n{share:.0%}", ha="center", va="center", color="white" if share > 0.5 else "black"
        )
    ticks = range(len(class_names))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title="Confusion (argmax)")
    ax.set_xticklabels(class_names, rotation=30, ha="right")
    ax.set_yticklabels(class_names)
    return _save(fig, path)


def plot_reliability(path: Path, *, calibration: dict) -> str:
    """Reliability diagram: accuracy against mean confidence per bin, with the bins' example counts."""
    bins = [b for b in calibration["bins"] if b["count"]]
    width = 1 / calibration["num_bins"]
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    lower, accuracy = [b["lower"] for b in bins], [b["accuracy"] for b in bins]
    ax.bar(lower, accuracy, width=width, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="black", ms=3)
    for b in bins:
        ax.text(b["lower"] + width / 2, b["accuracy"] + 0.01, str(b["count"]), ha="center", fontsize=7)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence (max probability)", ylabel="accuracy")
    ax.set_title(f"Reliability (ECE {calibration['ece']:.3f}, {calibration['num_bins']} bins)")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)
