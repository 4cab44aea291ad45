"""Segmentation metrics against hand-computed cases, brute-force distances and medpy (independent)."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from medjax import segmentation_metrics as sm


def _square(shape, top, left, side):
    mask = np.zeros(shape, bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_dice_and_iou_of_two_squares_offset_by_three_pixels():
    # 10x10 squares shifted 3 columns: overlap 10 x 7 = 70 -> Dice 140 / 200, IoU 70 / 130.
    ref, pred = _square((32, 32), 5, 5, 10), _square((32, 32), 5, 8, 10)
    dice, iou = sm.overlap(pred, ref)
    assert dice == pytest.approx(0.7) and iou == pytest.approx(70 / 130)


def test_hd95_of_parallel_lines_is_their_offset_in_physical_units():
    ref, pred = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
    ref[5, 3:25], pred[9, 3:25] = True, True  # every pixel is 4 rows from the other line
    assert sm.hausdorff(pred, ref) == pytest.approx(4.0)
    assert sm.hausdorff(pred, ref, spacing=(2.5, 0.7)) == pytest.approx(10.0)
    assert sm.hausdorff(pred, ref, spacing=(2.5, 0.7), symmetric="max") == pytest.approx(10.0)


def test_hd95_of_single_pixels_with_anisotropic_spacing_2d_and_3d():
    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[0, 0], b[3, 4] = True, True
    assert sm.hausdorff(a, b) == pytest.approx(5.0)
    assert sm.hausdorff(a, b, spacing=(2.0, 0.5)) == pytest.approx(math.sqrt(6.0**2 + 2.0**2))
    a3, b3 = np.zeros((4, 5, 5), bool), np.zeros((4, 5, 5), bool)
    a3[0, 0, 0], b3[2, 1, 1] = True, True
    assert sm.hausdorff(a3, b3, spacing=(3.0, 1.0, 1.0)) == pytest.approx(math.sqrt(38.0))


def test_hd95_pooled_and_max_differ_as_hand_computed():
    # Reference: a 20-pixel line. Prediction: the same line plus 3 isolated pixels 10 rows away.
    ref = np.zeros((12, 20), bool)
    ref[0, :] = True
    pred = ref.copy()
    pred[10, [0, 5, 9]] = True
    # Pooled: 40 zeros and 3 tens; the 95th percentile sits at rank 0.95 * 42 = 39.9 -> 0.9 * 10 = 9.
    assert sm.hausdorff(pred, ref) == pytest.approx(9.0)
    # Max of directed: prediction -> reference has 20 zeros and 3 tens, rank 20.9 -> 10; the other is 0.
    assert sm.hausdorff(pred, ref, symmetric="max") == pytest.approx(10.0)
    assert sm.hausdorff(pred, ref, percentile=100) == pytest.approx(10.0)  # plain Hausdorff


def test_surface_distances_equal_brute_force_over_surface_pixels():
    rng = np.random.default_rng(0)
    for spacing in [(1.0, 1.0), (0.8, 2.2)]:
        pred = rng.random((24, 20)) > 0.7
        ref = np.roll(pred, 2, axis=1) | (rng.random((24, 20)) > 0.9)
        forward, backward = sm.surface_distances(pred, ref, spacing)
        ps, rs = (np.argwhere(sm.surface(m)) * np.asarray(spacing) for m in (pred, ref))
        pair = cdist(ps, rs)
        np.testing.assert_allclose(np.sort(forward), np.sort(pair.min(axis=1)), rtol=1e-6)
        np.testing.assert_allclose(np.sort(backward), np.sort(pair.min(axis=0)), rtol=1e-6)


def test_surface_is_the_border_and_the_image_edge_counts_as_outside():
    mask = np.ones((4, 5), bool)
    expected = np.ones((4, 5), bool)
    expected[1:3, 1:4] = False
    np.testing.assert_array_equal(sm.surface(mask), expected)


def test_agrees_with_medpy_on_random_blobs_2d_and_3d():
    binary = pytest.importorskip("medpy.metric.binary")
    from scipy import ndimage

    rng = np.random.default_rng(1)
    for shape, spacing in [((40, 36), (0.7, 1.3)), ((12, 30, 28), (2.5, 0.8, 0.8))]:
        for _ in range(3):
            pred = ndimage.gaussian_filter(rng.random(shape), 2) > 0.52
            ref = ndimage.gaussian_filter(rng.random(shape), 2) > 0.52
            assert sm.hausdorff(pred, ref, spacing=spacing) == pytest.approx(
                binary.hd95(pred, ref, voxelspacing=spacing), rel=1e-9
            )
            assert sm.overlap(pred, ref)[0] == pytest.approx(binary.dc(pred, ref), rel=1e-12)
            assert sm.overlap(pred, ref)[1] == pytest.approx(binary.jc(pred, ref), rel=1e-12)


def test_empty_mask_conventions():
    empty, square = np.zeros((10, 10), bool), _square((10, 10), 2, 2, 3)
    assert all(math.isnan(v) for v in sm.overlap(empty, empty))
    assert math.isnan(sm.hausdorff(empty, empty))
    assert sm.overlap(empty, square) == (0.0, 0.0) and sm.overlap(square, empty) == (0.0, 0.0)
    assert math.isnan(sm.hausdorff(square, empty))
    penalty = sm.diagonal((10, 10), (1.0, 2.0))
    assert penalty == pytest.approx(math.hypot(9.0, 18.0))
    assert sm.hausdorff(empty, square, empty_distance=penalty) == penalty
    assert math.isnan(sm.hausdorff(empty, empty, empty_distance=penalty))  # absent class: no penalty


def test_per_class_metrics_with_a_field_of_view():
    ref = np.zeros((16, 16), int)
    ref[2:6, 2:6] = 1
    ref[10:14, 10:14] = 2
    pred = ref.copy()
    pred[0, 15] = 1  # a false positive outside the field of view: ignored
    pred[10:14, 10:14] = 0  # class 2 missed entirely
    valid = np.ones((16, 16), bool)
    valid[0, 15] = False
    got = sm.per_class_metrics(pred, ref, num_classes=4, valid=valid)
    np.testing.assert_array_equal(got["dice"], [1.0, 0.0, np.nan])  # class 3 absent everywhere: NaN
    np.testing.assert_array_equal(got["iou"], [1.0, 0.0, np.nan])
    np.testing.assert_array_equal(got["hd95"], [0.0, np.nan, np.nan])
    without_fov = sm.per_class_metrics(pred, ref, num_classes=4, percentile=100)
    # The outlier at (0, 15) counts: 16 + 16 pixels and 16 shared; its nearest square pixel is (2, 5).
    assert without_fov["dice"][0] == pytest.approx(32 / 33)
    assert without_fov["hd95"][0] == pytest.approx(math.hypot(2, 10))
    with pytest.raises(ValueError, match="one entry per axis"):
        sm.per_class_metrics(pred, ref, num_classes=4, spacing=(1.0, 1.0, 1.0))


def test_stack_cases_restacks_slices_and_3d_distances_use_z_spacing():
    # Two cases, slices shuffled; case 'a' has its line one slice apart in prediction and reference.
    ref_slices = np.zeros((5, 6, 6), int)
    pred_slices = np.zeros((5, 6, 6), int)
    ref_slices[0, 2, :] = 1  # case a, slice 0
    pred_slices[3, 2, :] = 1  # case a, slice 1
    ref_slices[1, 4, :] = pred_slices[1, 4, :] = 1  # case b
    cases = sm.stack_cases(["a", "b", "b", "a", "b"], [0, 2, 0, 1, 1], pred_slices, ref_slices)
    assert list(cases) == ["a", "b"]
    pred_a, ref_a = cases["a"]
    assert pred_a.shape == (2, 6, 6) and ref_a[0, 2].all() and pred_a[1, 2].all()
    assert sm.per_class_metrics(pred_a, ref_a, num_classes=2, spacing=(2.5, 1.0, 1.0))["hd95"][0] == 2.5
    assert cases["b"][0][2, 4].all()  # slice index 2 of case b came from row 1
    with pytest.raises(ValueError, match="not consecutive and unique"):
        sm.stack_cases(["a", "a"], [0, 2], pred_slices[:2])


def test_pixel_auc_over_the_field_of_view():
    labels = np.array([[0, 1, 1, 0]])
    scores = np.array([[0.1, 0.8, 0.6, 0.9]])
    assert sm.pixel_auc(labels, scores) == pytest.approx(0.5)
    # Without the last pixel (outside the field of view) the ranking is perfect.
    assert sm.pixel_auc(labels, scores, valid=np.array([[1, 1, 1, 0]], bool)) == 1.0
    assert math.isnan(sm.pixel_auc(np.zeros(4), scores))


def test_case_report_means_and_bootstrap_over_cases():
    per_case = [
        {"dice": np.array([0.8, np.nan]), "iou": np.array([0.6, np.nan]), "hd95": np.array([2.0, np.nan])},
        {"dice": np.array([0.6, 0.5]), "iou": np.array([0.4, 0.3]), "hd95": np.array([4.0, np.nan])},
        {"dice": np.array([0.7, 0.9]), "iou": np.array([0.5, 0.8]), "hd95": np.array([3.0, 1.0])},
    ]
    report = sm.case_report(per_case, class_names=["liver", "kidney"], num_samples=200, seed=0)
    assert report["num_cases"] == 3
    dice = report["dice"]
    assert dice["per_class"]["liver"]["value"] == pytest.approx(0.7)
    assert dice["per_class"]["kidney"]["value"] == pytest.approx(0.7)  # NaN case left out
    assert dice["mean"]["value"] == pytest.approx(0.7)
    liver = dice["per_class"]["liver"]
    assert 0.6 - 1e-9 <= liver["low"] < 0.7 < liver["high"] <= 0.8 + 1e-9
    assert report["hd95"]["per_class"]["kidney"]["value"] == 1.0
    assert report["hd95"]["missing"] == {"liver": 0, "kidney": 1}  # case 2: kidney present, HD95 undefined
    # Resamples drawing only case 0 leave the kidney undefined: skipped and counted, not zero.
    kidney = dice["per_class"]["kidney"]
    assert kidney["skipped"] > 0 and kidney["resamples"] + kidney["skipped"] == 200
    again = sm.case_report(per_case, class_names=["liver", "kidney"], num_samples=200, seed=0)
    np.testing.assert_equal(again, report)
