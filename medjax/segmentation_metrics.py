"""Segmentation metrics on the host: per-class Dice, IoU and HD95 of images and 3-D cases, pixel AUC, and
bootstrap intervals over cases.

Everything works on integer label maps of any dimension: a 2-D image ``(H, W)`` or a case restacked from
its slices ``(D, H, W)`` (:func:`stack_cases`), which is how Synapse and ACDC results are reported (one
3-D Dice and HD95 per organ and patient, then averaged). Distances are in physical units when ``spacing``
(one entry per axis, e.g. ``(z, y, x)`` in mm) is given, in pixels otherwise.

Conventions (chosen once, here):

- **Surfaces** are a mask's pixels that vanish under one binary erosion with the face-connected structure
  (``mask & ~erode(mask)``, the image border counting as outside); distances run from each surface pixel of
  one mask to the nearest surface pixel of the other, by an exact Euclidean distance transform with
  ``spacing`` (SciPy). This is ``medpy.metric.binary``'s construction, against which the tests check.
- **HD95** (``symmetric='pooled'``, the default) is the 95th percentile of both directions' distances
  pooled, as ``medpy.metric.binary.hd95``, which TransUNet-style Synapse and ACDC tables (and so study B's
  numbers) are computed with; ``symmetric='max'`` is the larger of the two directed 95th percentiles, as
  MONAI's ``HausdorffDistanceMetric(percentile=95)``. Percentiles interpolate linearly (NumPy's default).
- **Empty masks.** Reference and prediction both empty: Dice, IoU and HD95 are NaN, i.e. the class is
  absent from the case and left out of the means (nnU-Net's ``compute_metrics`` and MONAI's
  ``ignore_empty=True``; medpy has no convention and raises). Exactly one empty: Dice and IoU are 0 (the
  formula), HD95 is ``empty_distance``, NaN by default (undefined, left out of the means, and counted in
  ``'missing'``) or a fixed penalty such as the image diagonal (:func:`diagonal`), as BraTS does.
  TransUNet's evaluation instead scores a class absent from the reference as Dice 1 / HD95 0 when anything
  is predicted, which rewards false positives: not adopted.
- **Field of view.** Pixels where ``valid`` is False count as neither prediction nor reference (they are
  set to background before any metric), as DRIVE's FOV convention asks.
- **Means.** A class's value over a split is the mean over the cases where it is defined (NaN left out);
  ``mean`` is the unweighted mean over the foreground classes of those class means (the "mean Dice" of
  Synapse/ACDC tables). Bootstrap intervals resample cases, as classification resamples examples
  (:func:`medjax.evaluate.statistics.bootstrap_indices`).
"""

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn import metrics as skm

from medjax.evaluate.statistics import bootstrap_indices, percentile_interval

METRICS = ("dice", "iou", "hd95")
SYMMETRIC = ("pooled", "max")


def surface(mask: np.ndarray) -> np.ndarray:
    """The pixels of a boolean mask that one face-connected erosion removes (its border)."""
    mask = np.asarray(mask, bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each surface pixel of ``pred`` to ``ref``'s surface, and from ``ref``'s to ``pred``'s.

    Both masks must be non-empty (the distance to an empty surface is undefined).
    """
    pred_surface, ref_surface = surface(pred), surface(ref)
    if not (pred_surface.any() and ref_surface.any()):
        raise ValueError("surface distances need two non-empty masks")
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_ref[pred_surface], to_pred[ref_surface]


def hausdorff(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    spacing: Sequence[float] | None = None,
    percentile: float = 95.0,
    symmetric: str = "pooled",
    empty_distance: float = math.nan,
) -> float:
    """Percentile Hausdorff distance (HD95 by default) between two boolean masks; conventions above."""
    if symmetric not in SYMMETRIC:
        raise ValueError(f"symmetric must be one of {SYMMETRIC}, got {symmetric!r}")
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() and not ref.any():
        return math.nan
    if not pred.any() or not ref.any():
        return float(empty_distance)
    forward, backward = surface_distances(pred, ref, spacing)
    if symmetric == "pooled":
        return float(np.percentile(np.concatenate([forward, backward]), percentile))
    return float(max(np.percentile(forward, percentile), np.percentile(backward, percentile)))


def overlap(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """``(Dice, IoU)`` of two boolean masks; NaN for both when both are empty."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    intersection = int(np.count_nonzero(pred & ref))
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if total == 0:
        return math.nan, math.nan
    return 2 * intersection / total, intersection / (total - intersection)


def diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Length of the image's diagonal in physical units: the largest possible surface distance, a common
    ``empty_distance`` penalty."""
    spacing = spacing if spacing is not None else (1.0,) * len(shape)
    return float(math.hypot(*((n - 1) * s for n, s in zip(shape, spacing, strict=True))))


def per_class_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    valid: np.ndarray | None = None,
    percentile: float = 95.0,
    symmetric: str = "pooled",
    empty_distance: float = math.nan,
) -> dict[str, np.ndarray]:
    """Dice, IoU and HD95 of every foreground class (1 .. K-1) of one image or case.

    Args:
      pred, ref: integer label maps of the same shape (2-D image or 3-D case).
      num_classes: K, background (0) included.
      spacing: physical size of a pixel along each axis; None measures in pixels.
      valid: boolean map of the pixels that count (e.g. a field of view); None counts all.
      percentile, symmetric, empty_distance: see :func:`hausdorff`.

    Returns:
      ``{'dice', 'iou', 'hd95'}``, each ``(K - 1,)`` float64 with NaN where undefined (conventions above).
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    if spacing is not None and len(spacing) != ref.ndim:
        raise ValueError(f"spacing {tuple(spacing)} needs one entry per axis of a {ref.ndim}-D map")
    if valid is not None:
        valid = np.asarray(valid, bool)
        pred, ref = np.where(valid, pred, 0), np.where(valid, ref, 0)
    result = {k: np.full(num_classes - 1, math.nan) for k in METRICS}
    for k in range(1, num_classes):
        p, r = pred == k, ref == k
        result["dice"][k - 1], result["iou"][k - 1] = overlap(p, r)
        result["hd95"][k - 1] = hausdorff(
            p, r, spacing=spacing, percentile=percentile, symmetric=symmetric, empty_distance=empty_distance
        )
    return result


def stack_cases(
    case_ids: Sequence, slice_indices: Sequence[int], *planes: np.ndarray
) -> dict[object, tuple[np.ndarray, ...]]:
    """Restacks per-slice 2-D maps into 3-D cases ``(D, H, W)``, slices ordered by index.

    Args:
      case_ids: ``(N,)`` the case (patient / volume) of each slice.
      slice_indices: ``(N,)`` each slice's position in its case.
      *planes: one or more ``(N, H, W)`` arrays (e.g. predictions and references), restacked alike.

    Raises:
      ValueError: when a case repeats a slice index or misses one (a gap would shorten z distances).
    """
    case_ids, slice_indices = np.asarray(case_ids), np.asarray(slice_indices)
    cases = {}
    for case in dict.fromkeys(case_ids.tolist()):
        rows = np.flatnonzero(case_ids == case)
        order = rows[np.argsort(slice_indices[rows], kind="stable")]
        got = slice_indices[order]
        if not np.array_equal(got, np.arange(got[0], got[0] + len(got))):
            raise ValueError(f"case {case!r}: slice indices {got.tolist()} are not consecutive and unique")
        cases[case] = tuple(np.asarray(p)[order] for p in planes)
    return cases


def pixel_auc(labels: np.ndarray, scores: np.ndarray, valid: np.ndarray | None = None) -> float:
    """ROC AUC of binary per-pixel ``scores`` (foreground probability) against 0/1 ``labels``, over the
    ``valid`` pixels (DRIVE: the field of view), all images pooled; NaN when one class is absent."""
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores).ravel()
    if valid is not None:
        keep = np.asarray(valid, bool).ravel()
        labels, scores = labels[keep], scores[keep]
    if len(np.unique(labels)) < 2:
        return math.nan
    return float(skm.roc_auc_score(labels, scores))


def summarize(values: np.ndarray) -> dict:
    """``{'per_class': (K-1,) mean over cases where defined, 'mean': mean of those}`` of a ``(cases,
    K-1)`` matrix; ``mean`` is NaN only when no class is defined anywhere."""
    values = np.asarray(values, np.float64)
    defined = ~np.isnan(values)
    counts = defined.sum(axis=0)
    sums = np.where(defined, values, 0.0).sum(axis=0)
    per_class = np.divide(sums, counts, out=np.full(values.shape[1], math.nan), where=counts > 0)
    usable = per_class[~np.isnan(per_class)]
    return {"per_class": per_class, "mean": float(usable.mean()) if len(usable) else math.nan}


def case_report(
    per_case: Sequence[dict[str, np.ndarray]],
    *,
    class_names: Sequence[str],
    num_samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Split-level Dice / IoU / HD95 with percentile bootstrap intervals over cases.

    Args:
      per_case: one :func:`per_class_metrics` result per case (or per image for 2-D datasets).
      class_names: the K-1 foreground class names, in label order.
      num_samples, seed, confidence: the bootstrap (cases resampled with replacement).

    Returns:
      ``{metric: {'mean': interval, 'per_class': {name: interval}, 'missing': {name: n}}, 'num_cases': N}``
      with intervals as :func:`medjax.evaluate.statistics.percentile_interval` (``value``, ``low``,
      ``high``, ``resamples``, ``skipped``); ``missing`` counts the cases where the class was defined in
      the reference but the metric was not (HD95 with an empty prediction).
    """
    if not per_case:
        raise ValueError("case_report needs at least one case")
    names = list(class_names)
    indices = bootstrap_indices(
        np.arange(len(per_case)), num_samples=num_samples, seed=seed, stratified=False
    )
    report = {"num_cases": len(per_case)}
    for metric in METRICS:
        values = np.stack([np.asarray(case[metric], np.float64) for case in per_case])
        if values.shape[1] != len(names):
            raise ValueError(f"{len(names)} class names for {values.shape[1]} foreground classes")
        point = summarize(values)
        draws = [summarize(values[idx]) for idx in indices]
        dice_defined = ~np.isnan(np.stack([np.asarray(case["dice"], np.float64) for case in per_case]))
        report[metric] = {
            "mean": percentile_interval(point["mean"], [d["mean"] for d in draws], confidence=confidence),
            "per_class": {
                name: percentile_interval(
                    point["per_class"][k], [d["per_class"][k] for d in draws], confidence=confidence
                )
                for k, name in enumerate(names)
            },
            "missing": {
                name: int(np.sum(dice_defined[:, k] & np.isnan(values[:, k]))) for k, name in enumerate(names)
            },
        }
    return report
