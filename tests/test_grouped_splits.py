"""Patients, near-duplicates and cross-validation folds in the split planner and the folder builders."""

import io

import numpy as np
import pytest
from PIL import Image

from medjax.data import near_duplicates, splits
from medjax.data.builders import _folder, chest_xray
from tests.test_builders import noise, prepare, read, split_of


def test_group_key_reads_kermany_patients():
    pattern = chest_xray.PATIENT_PATTERN
    assert _folder.group_key(pattern, "train/PNEUMONIA/person1372_bacteria_3501.jpeg") == "person1372"
    assert _folder.group_key(pattern, "train/PNEUMONIA/person1_virus_11.jpeg") == "person1"
    assert _folder.group_key(pattern, "train/NORMAL/IM-0429-0001-0002.jpeg") == "IM-0429"
    assert _folder.group_key(pattern, "test/NORMAL/NORMAL2-IM-0173-0001.jpeg") == "NORMAL2-IM-0173"
    assert _folder.group_key(pattern, "train/NORMAL/scan.png") is None
    assert _folder.group_key(r"patient_\d+", "a/patient_7/x.png") == "patient_7"  # No group: whole match.
    assert _folder.group_key("", "anything") is None
    with pytest.raises(ValueError, match="group_pattern '\\(person' is not a regular expression"):
        chest_xray.Builder.make_config(group_pattern="(person")


def test_patients_never_straddle_a_carved_validation_split():
    # 40 patients with 1-5 images each, all official train, plus 10 official test images.
    keys = [f"p{p}" for p in range(40) for _ in range(1 + p % 5)] + [None] * 10
    n = len(keys)
    labels = [int(k[1:]) % 2 if k else i % 2 for i, k in enumerate(keys)]
    official = ["train"] * (n - 10) + ["test"] * 10
    plan = splits.plan_splits(
        labels=labels,
        hashes=[str(i) for i in range(n)],
        official=official,
        validation_fraction=0.2,
        keys=keys,
    )
    sides = {}
    for key, split in zip(keys, plan.assignment, strict=True):
        if key is not None:
            sides.setdefault(key, set()).add(split)
    assert all(len(s) == 1 for s in sides.values())
    assert {s for (s,) in sides.values()} == {"train", "validation"}
    assert plan.assignment[-10:] == ("test",) * 10
    report = plan.report
    assert (report["patients"], report["patients_with_several_images"]) == (40, 32)
    assert (report["items_without_key"], report["straddling_patients"]) == (10, 0)
    # Per image (no keys), the same carve separates some patient.
    ungrouped = splits.plan_splits(
        labels=labels, hashes=[str(i) for i in range(n)], official=official, validation_fraction=0.2
    )
    by_key = {}
    for key, split in zip(keys, ungrouped.assignment, strict=True):
        if key is not None:
            by_key.setdefault(key, set()).add(split)
    assert any(len(s) > 1 for s in by_key.values())


def test_official_splits_report_shared_keys_and_near_duplicates():
    official = ["train"] * 6 + ["test"] * 4
    keys = ["a", "a", "b", "c", "d", "e", "a", "f", "g", "h"]  # Key 'a' in train and test.
    plan = splits.plan_splits(
        labels=[0, 0, 1, 1, 0, 1, 0, 1, 0, 1],
        hashes=[str(i) for i in range(10)],
        official=official,
        validation_fraction=None,
        keys=keys,
        near_pairs=[(3, 8), (4, 5)],  # One pair across train/test, one inside train.
        ids=[f"img{i}" for i in range(10)],
    )
    assert plan.assignment == tuple(official)
    report = plan.report
    assert (report["straddling_patients"], report["straddling_patient_examples"]) == (
        1,
        {"a": ["test", "train"]},
    )
    assert (report["near_duplicate_pairs"], report["straddling_near_duplicate_pairs"]) == (2, 1)
    assert report["straddling_near_duplicate_examples"] == [{"img3": "train", "img8": "test"}]


def test_cross_validation_folds_partition_everything_but_test():
    n = 90
    keys = [f"p{i // 3}" for i in range(60)] + [None] * 30  # 20 patients of 3 images, 30 singles.
    labels = [(i // 3) % 2 for i in range(60)] + [i % 3 == 0 for i in range(30)]
    hashes = [str(i) for i in range(n)]
    hashes[61] = hashes[7]  # An exact copy joins patient p2.
    near = [(62, 65)]
    plans = [
        splits.plan_splits(
            labels=labels, hashes=hashes, keys=keys, near_pairs=near, seed=3, cv_folds=3, cv_fold=k
        )
        for k in range(3)
    ]
    test = [p.assignment for p in plans]
    assert test[0].count("test") == test[1].count("test") == test[2].count("test") > 0
    in_test = [a == "test" for a in test[0]]
    assert all([a == "test" for a in t] == in_test for t in test)  # The same test split in every fold.
    for i in range(n):
        if not in_test[i]:
            assert [t[i] for t in test].count("validation") == 1  # Held out exactly once.
    for t in test:
        for group in ([3 * p, 3 * p + 1, 3 * p + 2] for p in range(20)):
            assert len({t[i] for i in group}) == 1
        assert t[61] == t[7] and t[62] == t[65]
    sizes = [t.count("validation") for t in test]
    assert max(sizes) - min(sizes) <= 3  # Balanced up to one patient.
    assert (
        plans[1].report["validation_source"] == "fold 1 of 3 over everything but test (grouped, stratified)"
    )
    with pytest.raises(ValueError, match="cv_folds"):
        splits.plan_splits(labels=labels, hashes=hashes, cv_folds=3, cv_fold=3)


def test_train_subset_is_grouped_stratified_nested_and_leaves_validation_and_test_alone():
    n = 300
    keys = [f"p{i // 3}" for i in range(150)] + [None] * 150  # 50 patients of 3 images, 150 singles.
    labels = [(i // 3) % 4 == 0 for i in range(150)] + [i % 4 == 0 for i in range(150)]  # 1 in 4 positive.
    hashes = [str(i) for i in range(n)]
    official = ["train"] * 240 + ["test"] * 60
    plan = {
        size: splits.plan_splits(
            labels=labels, hashes=hashes, keys=keys, official=official, seed=5, train_examples=size
        )
        for size in (0, 40, 120)
    }
    full = plan[0].assignment
    for size in (40, 120):
        a = plan[size].assignment
        assert all(a[i] == full[i] for i in range(n) if full[i] != "train")  # Validation, test as before.
        kept = [i for i in range(n) if a[i] == "train"]
        assert abs(len(kept) - size) <= 2 and all(full[i] == "train" for i in kept)
        assert sum(labels[i] for i in kept) == pytest.approx(size / 4, abs=2)  # Stratified.
        for p in range(50):  # Whole patients in or out.
            assert len({a[3 * p + k] for k in range(3)}) == 1
        assert plan[size].report["train_subset"] == {
            "requested": size,
            "kept": len(kept),
            "of": full.count("train"),
        }
        assert plan[size].report["counts"]["test"] == plan[0].report["counts"]["test"]
    small, large = ({i for i, s in enumerate(plan[k].assignment) if s == "train"} for k in (40, 120))
    assert small <= large  # Nested: 40 labels are a part of the 120.
    assert "train_subset" not in plan[0].report and plan[40].report["duplicates_dropped"] == 0
    with pytest.raises(ValueError, match="train_examples"):
        splits.plan_splits(labels=labels, hashes=hashes, train_examples=-1)
    with pytest.raises(ValueError, match="train_examples=241, but the training split holds 216 items"):
        splits.plan_splits(labels=labels, hashes=hashes, official=official, train_examples=241)


def _jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer))


def test_near_duplicates_survive_reencoding_resizing_and_brightness_not_other_images():
    yy, xx = np.mgrid[0:96, 0:96]
    base = (127 + 60 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + noise((96, 96)) * 0.2).astype(np.uint8)
    copies = [
        _jpeg_round_trip(base, 60),
        np.asarray(Image.fromarray(base).resize((64, 64), Image.Resampling.BILINEAR)),
        np.clip(base.astype(int) + 25, 0, 255).astype(np.uint8),
    ]
    others = [noise((96, 96)), base.T.copy(), base[::-1].copy()]
    thumbs = np.stack([near_duplicates.thumbnail(x[..., None]) for x in [base, *copies, *others]])
    assert thumbs.shape == (7, 32, 32) and thumbs.dtype == np.uint8
    pairs = near_duplicates.find_pairs(thumbs)
    assert sorted(pairs) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    hashes = near_duplicates.perceptual_hashes(thumbs)
    assert int(np.bitwise_count(hashes[0] ^ hashes[4])) > 20  # Unrelated images differ in ~32 of 64 bits.
    assert all(bin(int(h)).count("1") == 32 for h in hashes)  # Median split of 64 distinct coefficients.


def test_chest_xray_builder_keeps_patients_together_and_reports_a_near_copy_in_test(tmp_path):
    root = tmp_path / "manual"
    rng = np.random.default_rng(5)
    for split, patients in (("train", range(12)), ("test", range(100, 104))):
        for p in patients:
            for k in range(1 + p % 3):
                folder = root / split / "PNEUMONIA"
                folder.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (40, 40), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"person{p}_bacteria_{10 * p + k}.png")
        normal = root / split / "NORMAL"
        normal.mkdir(parents=True, exist_ok=True)
        for p in patients:
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(
                normal / f"IM-{p:04d}-0001.png"
            )
    # A JPEG re-encoding of a training image, in test: not pixel-identical, so only the near search finds it.
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).resize((40, 40)))
    Image.fromarray(smooth).save(root / "train" / "NORMAL" / "IM-0050-0001.png")
    Image.fromarray(smooth).save(root / "test" / "NORMAL" / "IM-0150-0001.jpeg", quality=70)
    builder = prepare(chest_xray, root, tmp_path / "data", channels=1, validation_fraction=0.3)
    where = split_of(read(builder))
    sides = {}
    for item, split in where.items():
        sides.setdefault(_folder.group_key(chest_xray.PATIENT_PATTERN, item), set()).add(split)
    assert all(len(s) == 1 for s in sides.values())
    assert {"train", "validation"} <= {s for (s,) in sides.values()}
    report = builder.info.metadata["preparation"]
    assert report["group_pattern"] == chest_xray.PATIENT_PATTERN
    assert (report["patients"], report["straddling_patients"], report["items_without_key"]) == (34, 0, 0)
    assert report["straddling_near_duplicate_pairs"] == 1
    (example,) = report["straddling_near_duplicate_examples"]
    assert example["test/NORMAL/IM-0150-0001.jpeg"] == "test"
    assert example["train/NORMAL/IM-0050-0001.png"] == where["train/NORMAL/IM-0050-0001.png"] != "test"
    few = prepare(chest_xray, root, tmp_path / "data", channels=1, validation_fraction=0.3, train_examples=8)
    subset = split_of(read(few))
    held_out = {item: s for item, s in where.items() if s != "train"}
    assert {item: s for item, s in subset.items() if s != "train"} == held_out  # Untouched.
    assert few.info.metadata["preparation"]["train_subset"]["kept"] == list(subset.values()).count("train")
    assert {item for item, s in subset.items() if s == "train"} < {
        item for item, s in where.items() if s == "train"
    }
