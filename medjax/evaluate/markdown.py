"""``report.md``: the human-readable form of an evaluation's ``report.json``.

The title and the model card are the same for every task; the body (metrics, thresholds, figures) is
the task's (``task.report_lines``). ``fmt`` and ``table`` are the shared cell and table formatting.
"""

import math
from collections.abc import Sequence
from types import ModuleType


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a table cell; ``n/a`` for None and NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(head: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """Markdown table lines."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def markdown(report: dict, task: ModuleType) -> str:
    """The whole report: title, the task's body, the model card."""
    members = report["members"]
    title = (
        f"# Evaluation of `{members[0]['workdir']}` (checkpoint step {members[0]['checkpoint_step']})"
        if len(members) == 1
        else f"# Evaluation of an ensemble of {len(members)} runs (mean of their predictions)"
    )
    lines = [title, "", *task.report_lines(report), *_model_card_lines(report["model_card"])]
    return "\n".join(lines) + "\n"


def _model_card_lines(card: dict) -> list[str]:
    p, recipe, data = card["profile"], card["recipe"], card["training_data"]
    members = card.get("members", [])
    lines = ["", "## Model card", ""]
    if members:
        lines += [f"Totals over the {len(members)} members (latency: one after another).", ""]
    lines += table(
        [
            "parameters",
            "size of params (MB)",
            "GFLOPs / image (XLA, 2 per MAC)",
            f"latency batch 1 ({p['device']})",
        ],
        [
            [
                f"{p['params']:,}",
                fmt(p["params_mb"], 2),
                f"{p['gflops_per_image']:.4g}",
                f"{p['latency_b1_ms']:.2f} ms",
            ]
        ],
    )
    lines += ["", f"Training data: `{data['dataset']}`, examples per class:", ""]
    lines += table(["split", *data["class_names"]], [[k, *v] for k, v in data["label_counts"].items()])
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
    return lines + table(["member", "recipe differences", "parameters", "training run"], rows)


def _training_summary(training: dict | None) -> str:
    if not training:
        return "no report.json (unfinished run)."
    return ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in training.items())
