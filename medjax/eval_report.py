"""Pictures and Markdown of an evaluation report (the ``report.json`` dict of :mod:`medjax.evaluate`).

Figures use matplotlib's Agg backend through the object API (no pyplot state, no display needed); the
Markdown embeds them by relative path, so the report directory can be moved or attached as a whole.
"""

import math
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


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(head: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def markdown(report: dict) -> str:
    """The human-readable report: metrics with intervals, thresholds, calibration, figures, model card."""
    s = report["settings"]
    members = report["members"]
    title = (
        f"# Evaluation of `{members[0]['workdir']}` (checkpoint step {members[0]['checkpoint_step']})"
        if len(members) == 1
        else f"# Evaluation of an ensemble of {len(members)} runs (mean of their class probabilities)"
    )
    lines = [
        title,
        "",
        f"Classes: {', '.join(report['class_names'])}. Intervals: 95 % percentile bootstrap, "
        f"{s['bootstrap_samples']} resamples, seed {s['seed']}, "
        f"{'stratified by class' if s['stratified'] else 'unstratified'}. They measure the uncertainty due "
        "to the finite evaluation set, not training randomness (another seed trains another model).",
    ]
    for role, split in report["splits"].items():
        lines += ["", f"## {role} (`{split['split']}`, {split['num_examples']} examples)", ""]
        rows = [
            [name, _fmt(m["value"]), f"{_fmt(m['low'])} to {_fmt(m['high'])}", m["skipped"]]
            for name, m in split["metrics"].items()
        ]
        lines += _table(["metric", "value", "95 % interval", "resamples skipped"], rows)
        calibration = split["calibration"]
        lines += [
            "",
            f"Expected calibration error ({calibration['num_bins']} equal-width bins of the top-class "
            f"probability): {_fmt(calibration['ece'])}.",
            "",
        ]
        lines += [f"![{role} {kind}]({file})" for kind, file in split["figures"].items()]
        lines += ["", "Per class (argmax):", ""]
        per_class = [
            [name, _fmt(r["precision"]), _fmt(r["recall"]), _fmt(r["f1-score"]), int(r["support"])]
            for name, r in split["per_class"].items()
            if name in report["class_names"]
        ]
        lines += _table(["class", "precision", "recall", "F1", "support"], per_class)
    if "thresholds" in report:
        lines += _threshold_lines(report["thresholds"])
    lines += _model_card_lines(report["model_card"])
    return "\n".join(lines) + "\n"


def _threshold_lines(thresholds: dict) -> list[str]:
    lines = ["", "## Decision thresholds (chosen on validation, applied unchanged to test)", ""]
    if "note" in thresholds:
        return [*lines, thresholds["note"]]
    rows = [
        [
            rule,
            f"{entry['threshold']:.6g}",
            role,
            *(_fmt(op[k]) for k in ("sensitivity", "specificity", "ppv", "npv")),
        ]
        for rule, entry in thresholds["rules"].items()
        for role, op in entry.items()
        if role != "threshold"
    ]
    head = ["rule", "threshold", "split", "sensitivity", "specificity", "PPV", "NPV"]
    return (
        lines
        + _table(head, rows)
        + ["", "A score (probability of the positive class) >= threshold is positive."]
    )


def _model_card_lines(card: dict) -> list[str]:
    p, recipe, data = card["profile"], card["recipe"], card["training_data"]
    members = card.get("members", [])
    lines = ["", "## Model card", ""]
    if members:
        lines += [f"Totals over the {len(members)} members (latency: one after another).", ""]
    lines += _table(
        [
            "parameters",
            "size of params (MB)",
            "GFLOPs / image (XLA, 2 per MAC)",
            f"latency batch 1 ({p['device']})",
        ],
        [
            [
                f"{p['params']:,}",
                _fmt(p["params_mb"], 2),
                f"{p['gflops_per_image']:.4g}",
                f"{p['latency_b1_ms']:.2f} ms",
            ]
        ],
    )
    lines += ["", f"Training data: `{data['dataset']}`, examples per class:", ""]
    lines += _table(["split", *data["class_names"]], [[k, *v] for k, v in data["label_counts"].items()])
    lines += ["", "Recipe" + " of the first member" * bool(members) + ":", ""]
    lines += [f"- {key}: `{value}`" for key, value in recipe.items()]
    if not members:
        return [*lines, "", f"Training run: {_training_summary(card.get('training'))}"]
    lines += ["", "Members:", ""]
    rows = [
        [
            i,
            ", ".join(f"{k} `{v}`" for k, v in m["recipe"].items() if v != recipe[k]) or "none",
            f"{m['profile']['params']:,}",
            _training_summary(m.get("training")),
        ]
        for i, m in enumerate(members, 1)
    ]
    return lines + _table(["member", "recipe differences", "parameters", "training run"], rows)


def _training_summary(training: dict | None) -> str:
    if not training:
        return "no report.json (unfinished run)."
    return ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in training.items())
