"""Segmentation judging against hand-computed values: confusion, Dice/IoU, HD95 (MedPy's convention, in mm),
per-case 3-D metrics from restacked slices, pixel AUC, the human level, and the task's outputs."""

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from medjax.evaluate import seg_statistics as S
from medjax.tasks import segmentation

NAMES = ["background", "lesion"]


def test_confusion_counts_only_valid_pixels():
    label = np.array([[[0, 1], [1, 1]]])
    pred = np.array([[[1, 1], [0, 1]]])
    valid = np.array([[[True, True], [True, False]]])
    counts = S.confusion(pred, label, valid, 2)
    assert counts.tolist() == [[[0, 1], [1, 1]]]  # The invalid (1, 1) pixel is not counted.
    o = S.overlap(counts)
    assert o["dice"][0, 1] == pytest.approx(2 / 4) and o["iou"][0, 1] == pytest.approx(1 / 3)
    assert math.isnan(S.overlap(np.zeros((1, 2, 2)))["dice"][0, 1])  # Absent everywhere: undefined.


def test_histogram_auc_matches_scikit_learn():
    rng = np.random.default_rng(0)
    label = (rng.random((3, 20, 20)) < 0.3).astype(np.int32)
    scores = np.clip(0.35 * label + rng.random(label.shape) * 0.7, 0, 1).astype(np.float32)
    valid = np.ones(label.shape, bool)
    groups = [np.array([0]), np.array([1, 2])]
    hist = S.auc_histograms(scores, label, valid, groups, 4096)
    exact = skm.roc_auc_score(label.ravel(), scores.ravel())
    assert float(S.histogram_auc(hist.sum(0))) == pytest.approx(exact, abs=1e-3)


def _volume_predictions():
    """Two cases of two slices each (stored out of slice order) with hand-checkable overlaps."""
    label = np.zeros((4, 4, 4), np.int32)
    pred = np.zeros((4, 4, 4), np.uint8)
    # Case a, slice 1 (row 0): reference 2 pixels, predicted both. Slice 0 (row 1): reference 2, predicted 0.
    label[0, 0, :2] = pred[0, 0, :2] = 1
    label[1, 3, :2] = 1
    # Case b: slice 0 (row 2) perfect 4 pixels; slice 1 (row 3) empty in both.
    label[2, :2, :2] = pred[2, :2, :2] = 1
    examples = {
        "id": np.array([b"a1", b"a0", b"b0", b"b1"]),
        "case_id": np.array([b"a", b"a", b"b", b"b"]),
        "slice_index": np.array([1, 0, 0, 1]),
        "spacing": np.tile(np.array([[0.5, 0.5, 2.0]], np.float32), (4, 1)),
    }
    valid = np.ones(label.shape, bool)
    preview = np.zeros((4, 4, 4, 1), np.uint8)
    return {"split": "test", "examples": examples, "label": label, "valid": valid, "prediction": pred,
            "score": pred.astype(np.float32) * 0.8 + 0.1, "preview": preview}  # fmt: skip


def test_judge_volumes_per_case_3d_metrics(tmp_path):
    settings = {"bootstrap_samples": 50, "seed": 0, "overlays": 1}
    report = segmentation.judge(
        {"test": _volume_predictions()}, out=tmp_path, class_names=NAMES, settings=settings
    )
    split = report["splits"]["test"]
    assert split["unit"] == "case" and split["num_units"] == 2 and split["distance_unit"] == "mm"
    rows = {r["unit"]: r for r in split["per_case"]}
    assert rows["a"]["dice_lesion"] == pytest.approx(2 * 2 / (2 + 4))  # 3-D: slices pooled.
    assert rows["b"]["dice_lesion"] == 1.0 and rows["b"]["hd95_lesion"] == 0.0
    # Case a restacked in slice order (0: missed pixels at row 3; 1: found pixels at row 0): every missed
    # reference pixel is one slice (2 mm) and 3 rows (1.5 mm) from the prediction.
    missed = math.hypot(2.0, 1.5)
    pooled = np.array([0, 0, 0, 0, missed, missed])  # pred->ref: 2 zeros; ref->pred: 2 zeros, 2 misses.
    assert rows["a"]["hd95_lesion"] == pytest.approx(np.percentile(pooled, 95))
    m = split["metrics"]
    assert m["dice_lesion"]["value"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["pixel_dice_lesion"]["value"] == pytest.approx(2 * 6 / (6 + 8))
    assert m["sensitivity"]["value"] == pytest.approx(6 / 8) and m["specificity"]["value"] == 1.0
    assert m["pixel_auc"]["value"] == pytest.approx(skm.roc_auc_score(
        _volume_predictions()["label"].ravel(), _volume_predictions()["score"].ravel()))  # fmt: skip
    assert m["dice_lesion"]["low"] <= m["dice_lesion"]["value"] <= m["dice_lesion"]["high"]
    assert (tmp_path / "per_case_test.csv").read_text().splitlines()[0].startswith("unit,slices,dice_lesion")
    assert set(split["figures"]) == {"best", "worst"} and (tmp_path / split["figures"]["best"]).exists()
    json.dumps(report)


def test_judge_images_with_second_observer_as_human_level(tmp_path):
    p = _volume_predictions()
    del p["examples"]["slice_index"], p["examples"]["case_id"]
    p["examples"]["spacing"][:] = 0  # Unknown spacing: distances in pixels.
    observer = p["label"].copy().astype(np.uint8)
    observer[0] = 0  # The second rater misses image 0's two pixels.
    p["second_observer"] = observer
    settings = {"bootstrap_samples": 20, "seed": 0}
    split = segmentation.judge({"test": p}, out=tmp_path, class_names=NAMES, settings=settings)["splits"][
        "test"
    ]
    assert split["unit"] == "image" and split["num_units"] == 4 and split["distance_unit"] == "pixels"
    assert split["metrics"]["dice_lesion"]["value"] == pytest.approx((1 + 0 + 1) / 3)  # Image 3 undefined.
    human = split["human"]["second_observer"]
    assert human["pixel_dice_lesion"] == pytest.approx(2 * 6 / (6 + 8))
    assert human["dice_lesion"] == pytest.approx((0 + 1 + 1) / 3)


def test_validation_metrics_and_ensemble():
    p = _volume_predictions()
    m = segmentation.validation_metrics(p, NAMES)
    assert m["dice_lesion"] == pytest.approx((1 + 0 + 1) / 3) and m["mean_dice"] == m["dice_lesion"]
    assert m["pixel_accuracy"] == pytest.approx(62 / 64) and 0.5 < m["pixel_auc"] <= 1.0
    other = p | {"score": 1.0 - p["score"]}
    mean = segmentation.ensemble([p, other])
    assert np.allclose(mean["score"], 0.5) and (mean["prediction"] == 1).all()
    votes = segmentation.ensemble(
        [{"prediction": np.array([[2, 1]], np.uint8)}, {"prediction": np.array([[1, 1]], np.uint8)}]
    )
    assert votes["prediction"].tolist() == [[1, 1]]  # A 1-1 tie goes to the lower class.
