"""Statistics that judge a segmentation: overlap, surface distance, pixel AUC, over images or cases.

Pure numpy / scipy functions of predicted and reference label maps, tested against hand-computed values;
:mod:`medjax.tasks.segmentation` feeds them a run's predictions.

Conventions (medjax's, stated once here):
  * Only pixels with ``valid`` count (DRIVE's field of view; padding is never valid).
  * A **unit** is what a mean and a bootstrap resample run over: an image for 2-D data, a case (the
    restacked slices of one volume, ordered by ``slice_index``) when the split holds volumes. Intervals are
    95 % percentile bootstrap intervals over units, like classification's over examples (unstratified).
  * Per unit and class: Dice ``2|P n G| / (|P| + |G|)`` and IoU ``|P n G| / |P u G|`` are undefined (NaN,
    left out of means, as nnU-Net's summary does) when the class is absent from both prediction and
    reference. HD95 is :func:`medjax.segmentation_metrics.hausdorff` (MedPy's ``hd95``: both directions'
    surface distances pooled; NaN when either mask is empty), in mm when the spacing is known, else pixels.
    Those are the per-case conventions of :mod:`medjax.segmentation_metrics`; this module adds what a
    split report needs on top: confusion counts per image, the pooled pixel metrics, and a bootstrap
    that recomputes all of them (and the pixel AUC) from per-unit sums as one matrix product.
  * "Pixel" metrics pool every valid pixel of the split (DRIVE's convention for F1/accuracy/AUC); the
    per-unit ones average units. Pixel AUC is exact (:func:`medjax.segmentation_metrics.pixel_auc`)
    for the point value; its bootstrap uses per-unit score histograms on 4096 quantile bins of the
    pooled scores (pairs sharing a bin count half, which moves an AUC by less than 1/4096).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from medjax import segmentation_metrics


def confusion(pred: np.ndarray, label: np.ndarray, valid: np.ndarray, num_classes: int) -> np.ndarray:
    """``(N, K, K)`` per-image confusion counts (rows: reference class, columns: predicted) inside valid."""
    pred, label, valid = np.asarray(pred), np.asarray(label), np.asarray(valid, bool)
    flat = label.astype(np.int64) * num_classes + pred.astype(np.int64)
    k2 = num_classes * num_classes
    offsets = np.arange(len(flat), dtype=np.int64)[:, None] * k2
    codes = (flat.reshape(len(flat), -1) + offsets)[valid.reshape(len(valid), -1)]
    return np.bincount(codes, minlength=len(flat) * k2).reshape(len(flat), num_classes, num_classes)


def overlap(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Dice and IoU ``(..., K)`` of confusion counts ``(..., K, K)`` (NaN where a class is nowhere)."""
    counts = np.asarray(counts, np.float64)
    tp = np.diagonal(counts, axis1=-2, axis2=-1)
    reference, predicted = counts.sum(-1), counts.sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(reference + predicted > 0, 2 * tp / (reference + predicted), np.nan)
        iou = np.where(reference + predicted - tp > 0, tp / (reference + predicted - tp), np.nan)
    return {"dice": dice, "iou": iou}


def units(example_info: dict | None, num_examples: int) -> tuple[list[str], list[np.ndarray]]:
    """``(names, example indices of each unit)``: one unit per case when the split holds volume slices
    (``slice_index >= 0``), ordered by slice; else one per image."""
    if example_info is None or "case_id" not in example_info or (example_info["slice_index"] < 0).all():
        ids = None if example_info is None else example_info.get("id")
        names = [_text(ids[i]) if ids is not None else str(i) for i in range(num_examples)]
        return names, [np.array([i]) for i in range(num_examples)]
    cases = [_text(c) for c in example_info["case_id"]]
    names = list(dict.fromkeys(cases))
    slices = np.asarray(example_info["slice_index"])
    groups = []
    for name in names:
        members = np.flatnonzero(np.asarray(cases) == name)
        groups.append(members[np.argsort(slices[members], kind="stable")])
    return names, groups


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def unit_spacing(example_info: dict | None, members: np.ndarray, *, volume: bool) -> tuple | None:
    """Spacing ``(dz, dy, dx)`` of a case or ``(dy, dx)`` of an image in mm; None when not recorded."""
    if example_info is None or "spacing" not in example_info:
        return None
    dy, dx, dz = (float(v) for v in np.asarray(example_info["spacing"])[members[0]])
    if volume:
        return (dz, dy, dx) if min(dy, dx, dz) > 0 else None
    return (dy, dx) if min(dy, dx) > 0 else None


def unit_hd95(
    pred: np.ndarray, label: np.ndarray, valid: np.ndarray, members: np.ndarray, num_classes: int, spacing
) -> np.ndarray:
    """HD95 ``(K,)`` of one unit per class (class 0 NaN), on its restacked slices for a case."""
    p = np.asarray(pred)[members] * np.asarray(valid)[members]
    g = np.asarray(label)[members] * np.asarray(valid)[members]
    if len(members) == 1 and spacing is not None and len(spacing) == 2:
        p, g = p[0], g[0]
    out = np.full(num_classes, np.nan)
    for k in range(1, num_classes):
        out[k] = segmentation_metrics.hausdorff(*_cropped(p == k, g == k), spacing=spacing)
    return out


def _cropped(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union plus a 1-pixel margin: every surface pixel
    lies inside, so surface distances are unchanged while a small organ in a large volume costs little."""
    if not (pred.any() or ref.any()):
        return pred, ref
    box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(pred | ref))
    return np.pad(pred[box], 1), np.pad(ref[box], 1)


def auc_histograms(
    scores: np.ndarray, label: np.ndarray, valid: np.ndarray, groups: Sequence[np.ndarray], bins: int
) -> np.ndarray:
    """``(U, 2, bins)`` per-unit counts of negative / positive valid pixels per quantile bin of the
    pooled scores (the bootstrap's AUC needs only these)."""
    v = np.asarray(valid, bool)
    pooled = np.asarray(scores)[v]
    edges = np.unique(np.quantile(pooled, np.linspace(0, 1, bins + 1)[1:-1]))
    out = np.zeros((len(groups), 2, bins), np.int64)
    for u, members in enumerate(groups):
        m = v[members]
        codes = np.searchsorted(edges, np.asarray(scores)[members][m], side="right")
        positive = (np.asarray(label)[members][m] == 1).astype(np.int64)
        out[u] = np.bincount(positive * bins + codes, minlength=2 * bins).reshape(2, bins)
    return out


def histogram_auc(hist: np.ndarray) -> np.ndarray:
    """AUC ``(...)`` of ``(..., 2, bins)`` negative/positive histograms (ties within a bin count half)."""
    neg, pos = hist[..., 0, :].astype(np.float64), hist[..., 1, :].astype(np.float64)
    below = np.cumsum(neg, axis=-1) - neg
    pairs = neg.sum(-1) * pos.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (pos * (below + 0.5 * neg)).sum(-1) / pairs, np.nan)


def summary(
    counts: np.ndarray, per_unit: dict[str, np.ndarray], hist: np.ndarray | None, class_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Split metrics from per-unit arrays, for one weighting of the units or many at once.

    Args:
      counts: ``(U, K, K)`` confusion counts per unit.
      per_unit: ``{'dice', 'iou', 'hd95'}`` each ``(U, K)`` (NaN: undefined).
      hist: ``(U, 2, bins)`` AUC histograms (binary tasks) or None.
      class_names: background first.

    Returns:
      ``{metric: value}`` as given by :func:`weighted_summary` with all multiplicities 1.
    """
    return {
        k: v[0]
        for k, v in weighted_summary(np.ones((1, len(counts))), counts, per_unit, hist, class_names).items()
    }


def weighted_summary(
    weights: np.ndarray,
    counts: np.ndarray,
    per_unit: dict[str, np.ndarray],
    hist: np.ndarray | None,
    class_names: Sequence[str],
) -> dict[str, np.ndarray]:
    """Split metrics for each row of ``weights`` ``(R, U)`` (unit multiplicities of a resample).

    Per foreground class ``c``: ``dice_c``, ``iou_c``, ``hd95_c`` (means over units where defined) and
    ``pixel_dice_c`` (pooled counts); then ``mean_dice``, ``mean_iou``, ``mean_hd95`` (over foreground
    classes) and ``pixel_accuracy``; binary tasks add pooled ``sensitivity``, ``specificity`` and, with
    ``hist``, ``pixel_auc``.
    """
    w = np.asarray(weights, np.float64)
    pooled = np.einsum("ru,ukl->rkl", w, np.asarray(counts, np.float64))
    out: dict[str, np.ndarray] = {}
    fg = range(1, len(class_names))
    for name in ("dice", "iou", "hd95"):
        values = np.asarray(per_unit[name], np.float64)
        defined = ~np.isnan(values)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (w @ np.where(defined, values, 0.0)) / (w @ defined)  # (R, K)
        for k in fg:
            out[f"{name}_{class_names[k]}"] = means[:, k]
        fg_means = means[:, 1:]
        with np.errstate(invalid="ignore", divide="ignore"):  # All-NaN rows (no class defined) stay NaN.
            out[f"mean_{name}"] = np.nansum(fg_means, 1) / (~np.isnan(fg_means)).sum(1)
    pixel = overlap(pooled)["dice"]
    for k in fg:
        out[f"pixel_dice_{class_names[k]}"] = pixel[:, k]
    total = pooled.sum((1, 2))
    out["pixel_accuracy"] = np.trace(pooled, axis1=1, axis2=2) / np.maximum(total, 1)
    if len(class_names) == 2:
        tn, fp, fn, tp = (pooled[:, i, j] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out["sensitivity"] = tp / (tp + fn)
            out["specificity"] = tn / (tn + fp)
        if hist is not None:
            out["pixel_auc"] = histogram_auc(np.einsum("ru,ucb->rcb", w, np.asarray(hist, np.float64)))
    return out


def bootstrap(
    counts: np.ndarray,
    per_unit: dict[str, np.ndarray],
    hist: np.ndarray | None,
    class_names: Sequence[str],
    *,
    num_samples: int,
    seed: int,
    confidence: float = 0.95,
) -> dict[str, dict]:
    """``{metric: {'low', 'high', 'resamples', 'skipped'}}``: percentile intervals over resampled units
    (``num_samples`` draws of U units with replacement, from ``numpy.random.default_rng(seed)``)."""
    n = len(counts)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(num_samples, n))
    weights = np.zeros((num_samples, n))
    np.add.at(weights, (np.arange(num_samples)[:, None], draws), 1.0)
    values = weighted_summary(weights, counts, per_unit, hist, class_names)
    tail = 100 * (1 - confidence) / 2
    result = {}
    for name, v in values.items():
        usable = v[~np.isnan(v)]
        low, high = np.percentile(usable, [tail, 100 - tail]) if len(usable) else (math.nan, math.nan)
        result[name] = {
            "low": float(low),
            "high": float(high),
            "resamples": len(usable),
            "skipped": int(len(v) - len(usable)),
        }
    return result
