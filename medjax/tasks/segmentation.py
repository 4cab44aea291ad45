"""Segmentation: a class per pixel, predicted as ``(B, H, W, K)`` logits (background is class 0).

What this task owns (the interface is in :mod:`medjax.tasks`):

* training: cross-entropy + soft Dice by default (:mod:`medjax.losses`, both leaving out pixels outside
  ``valid``); pixel accuracy inside ``valid`` beside the loss at every step; validation metrics per class
  (Dice, IoU, pixel Dice) and, for two classes, the pixel AUC;
* what the inference pass keeps per image, sized for whole splits: the predicted class map (uint8), the
  positive class's probability for binary tasks (the AUC and ensembles need it; several classes keep only
  the class map, since K float maps per pixel of a volume set would not fit in memory), ``valid``, any
  extra reference mask of the batch (DRIVE's second observer) and a small uint8 preview of the image for
  the overlay figures;
* evaluation (``python -m medjax.evaluate``): an ensemble averages the members' probabilities (binary) or
  takes the per-pixel majority class (ties: the lower class); each split gets per-class and per-unit
  metrics with bootstrap intervals over images, or over cases when it holds volume slices (3-D Dice and
  HD95 on the restacked slices, in mm), a per-case CSV, overlays of the best and worst units and, where
  the split has a second observer, the human level. Conventions: :mod:`medjax.evaluate.seg_statistics`.
"""

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from medjax import segmentation_metrics
from medjax.evaluate import seg_figures
from medjax.evaluate import seg_statistics as S
from medjax.evaluate.markdown import fmt, table

# Batch planes compared with the reference as an extra rater when present (DRIVE's 2nd observer).
OBSERVERS = ("second_observer",)
# Rows of the per-case table in report.md (the CSV has every case).
MARKDOWN_CASES = 50
# Longest side of the image previews kept for the overlay figures.
PREVIEW_SIDE = 384


def default_loss() -> dict:
    return {"cross_entropy": {"weight": 1.0, "label_smoothing": 0.0}, "dice": {"weight": 1.0}}


def step_metrics(logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
    valid = batch["valid"]
    hit = (jnp.argmax(logits, -1) == batch["label"]) & valid
    return {"pixel_accuracy": hit.sum() / jnp.maximum(valid.sum(), 1)}


def eval_outputs(logits: jax.Array, aux: dict, batch: dict) -> dict[str, jax.Array]:
    del aux
    out = {
        "prediction": jnp.argmax(logits, -1).astype(jnp.uint8),
        "valid": batch["valid"],
        "preview": _preview(batch["image"]),
    }
    if logits.shape[-1] == 2:
        out["score"] = jax.nn.softmax(logits.astype(jnp.float32), -1)[..., 1]
    return out | {k: batch[k].astype(jnp.uint8) for k in OBSERVERS if k in batch}


def _preview(images: jax.Array) -> jax.Array:
    """Every ``s``-th pixel (longest side <= :data:`PREVIEW_SIDE`), each image stretched to uint8."""
    stride = -(-max(images.shape[1:3]) // PREVIEW_SIDE)
    x = images[:, ::stride, ::stride]
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    return (255 * (x - lo) / jnp.maximum(hi - lo, 1e-6)).astype(jnp.uint8)


# What validation_metrics gives (binary tasks add sensitivity, specificity and pixel_auc), plus the loss,
# and the per-class metrics as ``<prefix>_<class name>``: what a run may select or stop early on.
VALIDATION_METRICS = (
    "loss",
    "mean_dice",
    "mean_iou",
    "pixel_accuracy",
    "sensitivity",
    "specificity",
    "pixel_auc",
)
PER_CLASS_METRICS = ("dice", "iou", "pixel_dice")


def validation_metrics(predictions: dict, class_names: Sequence[str]) -> dict:
    """Per-class Dice/IoU (means over images), pixel Dice, pixel accuracy and, binary, the pixel AUC
    (no surface distances: they cost seconds per image and training only needs a selection signal)."""
    num_classes = len(class_names)
    counts = S.confusion(predictions["prediction"], predictions["label"], predictions["valid"], num_classes)
    per_unit = S.overlap(counts) | {"hd95": np.full(counts.shape[:2], np.nan)}
    values = S.summary(counts, per_unit, None, class_names)
    result = {k: float(v) for k, v in values.items() if "hd95" not in k}
    if "score" in predictions:
        result["pixel_auc"] = segmentation_metrics.pixel_auc(
            predictions["label"], predictions["score"], predictions["valid"]
        )
    return result


def headline(m: dict) -> str:
    line = f"mean Dice {m['mean_dice']:.4f} mean IoU {m['mean_iou']:.4f}"
    return line + (f" pixel AUC {m['pixel_auc']:.4f}" if "pixel_auc" in m else "")


def ensemble(member_predictions: Sequence[dict]) -> dict:
    """One member's reference planes with the members' mean positive probability (binary) or their
    per-pixel majority class."""
    first = member_predictions[0]
    kept = {k: v for k, v in first.items() if k not in ("prediction", "score", "loss_sum")}
    if "score" in first:
        score = np.mean([p["score"] for p in member_predictions], axis=0)
        return kept | {"score": score, "prediction": (score >= 0.5).astype(np.uint8)}
    num_classes = int(max(p["prediction"].max() for p in member_predictions)) + 1
    votes = sum(np.eye(num_classes, dtype=np.int32)[p["prediction"]] for p in member_predictions)
    return kept | {"prediction": np.argmax(votes, -1).astype(np.uint8)}


def judge(predictions: dict[str, dict], *, out: Path, class_names: Sequence[str], settings: dict) -> dict:
    """The evaluation of ``{role: {'split', 'examples', 'label', 'valid', 'prediction', ...}}``: each
    split's metrics with intervals, per class, per unit (CSV), the human level and overlays."""
    return {
        "class_names": list(class_names),
        "splits": {
            role: {"split": p["split"]} | _judge_split(out, role, p, list(class_names), settings)
            for role, p in predictions.items()
        },
    }


def _judge_split(out: Path, role: str, p: dict, names: list[str], settings: dict) -> dict:
    num_classes = len(names)
    label, valid, pred = p["label"], p["valid"], p["prediction"]
    info = p.get("examples")
    unit_names, groups = S.units(info, len(label))
    volume = info is not None and "slice_index" in info and bool((np.asarray(info["slice_index"]) >= 0).any())
    image_counts = S.confusion(pred, label, valid, num_classes)
    counts = np.stack([image_counts[g].sum(0) for g in groups])
    per_unit = S.overlap(counts)
    spacings = [S.unit_spacing(info, g, volume=volume) for g in groups]
    per_unit["hd95"] = np.stack(
        [S.unit_hd95(pred, label, valid, g, num_classes, s) for g, s in zip(groups, spacings, strict=True)]
    )
    hist = None
    if "score" in p:
        hist = S.auc_histograms(p["score"], label, valid, groups, settings.get("auc_bins", 4096))
    point = S.summary(counts, per_unit, hist, names)
    if "score" in p:
        point["pixel_auc"] = segmentation_metrics.pixel_auc(label, p["score"], valid)
    intervals = S.bootstrap(
        counts, per_unit, hist, names, num_samples=settings["bootstrap_samples"], seed=settings["seed"]
    )
    metrics = {k: {"value": float(v)} | intervals[k] for k, v in point.items()}
    rows = _unit_rows(unit_names, groups, counts, per_unit, names)
    _write_csv(out / f"per_case_{role}.csv", rows)
    unit_dice = np.array([_nanmean(d) for d in per_unit["dice"][:, 1:]])  # Ranks the overlays.
    report = {
        "unit": "case" if volume else "image",
        "num_examples": len(label),
        "num_units": len(groups),
        "distance_unit": "mm" if any(s is not None for s in spacings) else "pixels",
        "metrics": metrics,
        "per_class": _per_class(counts, per_unit, names),
        "per_case": rows,
        "figures": seg_figures.plot_best_and_worst(
            out, role, p, groups, unit_names, unit_dice, count=settings.get("overlays", 3)
        ),
    }
    observers = [k for k in OBSERVERS if k in p and np.asarray(p[k])[np.asarray(valid, bool)].any()]
    if observers:
        report["human"] = {k: _rater(p[k], label, valid, groups, names) for k in observers}
    return report


def _rater(rater: np.ndarray, label, valid, groups, names) -> dict:
    """Point metrics of another rater's masks against the reference, like a prediction's."""
    counts = S.confusion(rater, label, valid, len(names))
    counts = np.stack([counts[g].sum(0) for g in groups])
    per_unit = S.overlap(counts) | {"hd95": np.full(counts.shape[:2], np.nan)}
    return {k: float(v) for k, v in S.summary(counts, per_unit, None, names).items() if "hd95" not in k}


def _per_class(counts: np.ndarray, per_unit: dict, names: list[str]) -> dict:
    pooled = counts.sum(0)
    rows = {}
    for k, name in enumerate(names):
        if k == 0:
            continue
        rows[name] = {
            "dice": _nanmean(per_unit["dice"][:, k]),
            "iou": _nanmean(per_unit["iou"][:, k]),
            "hd95": _nanmean(per_unit["hd95"][:, k]),
            "pixel_dice": float(S.overlap(pooled)["dice"][k]),
            "reference_pixels": int(pooled[k].sum()),
            "predicted_pixels": int(pooled[:, k].sum()),
            "units_with_class": int((counts[:, k].sum(-1) > 0).sum()),
        }
    return rows


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(x[~np.isnan(x)].mean()) if (~np.isnan(x)).any() else float("nan")


def _unit_rows(unit_names, groups, counts, per_unit, names) -> list[dict]:
    rows = []
    for u, name in enumerate(unit_names):
        row = {"unit": name, "slices": len(groups[u])}
        for k in range(1, len(names)):
            row[f"dice_{names[k]}"] = float(per_unit["dice"][u, k])
            row[f"iou_{names[k]}"] = float(per_unit["iou"][u, k])
            row[f"hd95_{names[k]}"] = float(per_unit["hd95"][u, k])
            row[f"reference_pixels_{names[k]}"] = int(counts[u, k].sum())
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    head = list(rows[0])
    lines = [",".join(head)] + [
        ",".join(f"{r[k]:.17g}" if isinstance(r[k], float) else str(r[k]) for k in head) for r in rows
    ]
    path.write_text("\n".join(lines) + "\n")


def report_lines(report: dict) -> list[str]:
    """The body of ``report.md``: per split, metrics with intervals, per class, the human level,
    overlays and the per-case table."""
    s = report["settings"]
    lines = [
        f"Classes: {', '.join(report['class_names'])}. Intervals: 95 % percentile bootstrap over units "
        f"(images, or cases for volumes), {s['bootstrap_samples']} resamples, seed {s['seed']}. "
        "Dice/IoU/HD95 are means over units where defined; pixel metrics pool every valid pixel.",
    ]
    for role, split in report["splits"].items():
        units = f"{split['num_examples']} images"
        if split["unit"] != "image":  # Volumes: their slices are the images.
            units += f" of {split['num_units']} {split['unit']}s"
        lines += ["", f"## {role} (`{split['split']}`, {units}; HD95 in {split['distance_unit']})", ""]
        rows = [
            [name, fmt(m["value"]), f"{fmt(m['low'])} to {fmt(m['high'])}", m["skipped"]]
            for name, m in split["metrics"].items()
        ]
        lines += table(["metric", "value", "95 % interval", "resamples skipped"], rows)
        lines += ["", "Per class:", ""]
        per_class = [
            [name, *(fmt(r[k]) for k in ("dice", "iou", "hd95", "pixel_dice")), r["units_with_class"]]
            for name, r in split["per_class"].items()
        ]
        lines += table(["class", "Dice", "IoU", "HD95", "pixel Dice", f"{split['unit']}s with it"], per_class)
        for rater, values in split.get("human", {}).items():
            lines += ["", f"Human level ({rater} against the reference): "
                      + ", ".join(f"{k} {fmt(v)}" for k, v in values.items()) + "."]  # fmt: skip
        lines += [""] + [f"![{role} {kind}]({file})" for kind, file in split["figures"].items()]
        head = [k for k in split["per_case"][0] if not k.startswith("reference_pixels")]
        shown = split["per_case"][:MARKDOWN_CASES]
        note = f"; the first {len(shown)}" if len(shown) < len(split["per_case"]) else ""
        lines += [
            "",
            f"Per {split['unit']} (all in `per_case_{role}.csv`{note}):",
            "",
        ]
        lines += table(head, [[fmt(r[k]) if isinstance(r[k], float) else r[k] for k in head] for r in shown])
    return lines
