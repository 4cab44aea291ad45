"""Segmentation builders on tiny archives generated in the real layouts (Pillow images, nibabel volumes).

Counts, pixel counts and label maps are worked out by hand from what each test writes; every dataset is
read back through ``as_data_source()`` (no TensorFlow).
"""

import json
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medjax.data import builders, pipeline
from medjax.data.builders import _segmentation as seg
from medjax.data.builders._folder import DatasetLayoutError
from medjax.data.images import ImageDecodeError
from tests.conftest import data_config, shared_data_dir

RNG = np.random.default_rng(0)
H, W = 16, 20


def prepare(name, manual_dir, data_dir, **builder_kwargs):
    builder = builders.get_builder(
        name, data_dir=str(data_dir), manual_dir=str(manual_dir), builder_kwargs=builder_kwargs
    )
    builders.prepare(builder)
    return builder


def read(builder) -> dict[str, list[dict]]:
    return {split: [src[i] for i in range(len(src))] for split, src in builder.as_data_source().items()}


def save(path, array, mode=None, palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    if palette:
        image.putpalette(palette)
    image.save(path)


def box_mask(value=255, rows=(2, 6), cols=(3, 8)) -> np.ndarray:
    """A 4 x 5 = 20 pixel rectangle of ``value`` on an H x W background."""
    mask = np.zeros((H, W), np.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = value
    return mask


def noise(shape=(H, W, 3)) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def test_sibling_layout_official_splits_carved_validation_and_pixel_counts(tmp_path):
    root = tmp_path / "manual" / "ISIC"
    for split, count in (("train", 6), ("test", 3)):
        for i in range(count):
            save(root / split / "images" / f"{split}{i}.jpg", noise())
            save(root / split / "masks" / f"{split}{i}_segmentation.png", box_mask())
    (root / "README.txt").write_text("not data")
    builder = prepare(
        "seg_folder", tmp_path / "manual", tmp_path / "data", root="ISIC", mask_suffix="_segmentation",
        validation_fraction=0.34,
    )  # fmt: skip
    examples = read(builder)
    assert {s: len(v) for s, v in examples.items()} == {"train": 4, "validation": 2, "test": 3}
    meta = builder.info.metadata["segmentation"]
    assert meta["class_names"] == ["background", "foreground"] and meta["num_classes"] == 2
    assert meta["pixel_counts"] == {"train": [1200, 80], "validation": [600, 40], "test": [900, 60]}
    assert meta["max_shape"]["test"] == [H, W]
    e = examples["test"][0]
    assert e["image"].shape == (H, W, 3) and e["mask"].shape == (H, W, 1) and e["valid"].all()
    np.testing.assert_array_equal(e["mask"][..., 0], box_mask(1))
    assert e["id"] == b"test/images/test0.jpg" and e["slice_index"] == -1
    assert builder.info.metadata["preparation"]["label_rule"].startswith("binary")


def write_busi(root):
    """BUSI-like: class folders, '<stem>_mask.png' beside each image, a second lesion mask '_mask_1'."""
    for i in range(1, 5):
        save(root / "benign" / f"benign ({i}).png", noise((H, W)))
        save(root / "benign" / f"benign ({i})_mask.png", box_mask(rows=(0, 2), cols=(0, W)))
    save(root / "benign" / "benign (1)_mask_1.png", box_mask(rows=(5, 7), cols=(0, W)))
    for i in range(1, 4):
        save(root / "normal" / f"normal ({i}).png", noise((H, W)))
        save(root / "normal" / f"normal ({i})_mask.png", np.zeros((H, W), np.uint8))


def test_suffix_layout_extra_masks_error_or_union_and_seeded_split(tmp_path):
    write_busi(tmp_path / "busi")
    options = {"layout": "suffix", "mask_suffix": "_mask", "channels": 1}
    with pytest.raises(DatasetLayoutError, match=r"benign \(1\)\.png: several masks .*extra_masks='union'"):
        prepare("seg_folder", tmp_path / "busi", tmp_path / "data", **options)
    builder = prepare("seg_folder", tmp_path / "busi", tmp_path / "data", extra_masks="union", **options)
    examples = read(builder)
    # Stratified by "has foreground": 4 lesion images -> 3/0/1, 3 normal ones -> 2/0/1 (70/10/20).
    assert {s: len(v) for s, v in examples.items()} == {"train": 5, "test": 2}
    by_id = {e["id"].decode(): e for rows in examples.values() for e in rows}
    assert int(by_id["benign/benign (1).png"]["mask"].sum()) == 4 * W  # Both lesion masks, merged.
    assert int(by_id["benign/benign (2).png"]["mask"].sum()) == 2 * W
    again = prepare("seg_folder", tmp_path / "busi", tmp_path / "data2", extra_masks="union", **options)
    assert [e["id"] for e in read(again)["test"]] == [e["id"] for e in examples["test"]]


def test_unpaired_and_mis_sized_masks_are_named_or_skipped_and_listed(tmp_path):
    root = tmp_path / "manual"
    for i in range(5):
        save(root / "images" / f"a{i}.png", noise())
    for i in (0, 1, 3):
        save(root / "masks" / f"a{i}.png", box_mask())
    save(root / "masks" / "a2.png", np.zeros((8, 10), np.uint8))
    save(root / "masks" / "zz.png", box_mask())
    unpaired = r"2 unpaired[\s\S]*a4.png: no mask[\s\S]*zz.png: mask without"
    with pytest.raises(DatasetLayoutError, match=unpaired):
        prepare("seg_folder", root, tmp_path / "data")
    (root / "masks" / "zz.png").unlink()
    save(root / "masks" / "a4.png", box_mask())
    with pytest.raises(ImageDecodeError, match=r"a2.png is 10x8 \(WxH\) but the image is 20x16"):
        prepare("seg_folder", root, tmp_path / "data")
    (root / "masks" / "a4.png").unlink()
    save(root / "masks" / "zz.png", box_mask())
    builder = prepare("seg_folder", root, tmp_path / "data", skip_corrupt=True)
    skipped = builder.info.metadata["preparation"]["skipped"]
    files = sorted(s["file"].split(":")[0] for s in skipped)
    assert files == ["images/a2.png", "images/a4.png", "masks/zz.png"]
    assert sum(len(v) for v in read(builder).values()) == 3


def test_colour_masks_with_class_colors_and_nearest_resize(tmp_path):
    root = tmp_path / "manual"
    colours = ((0, 0, 0), (255, 0, 0), (0, 255, 0))
    for i in range(4):
        labels = np.zeros((H, W), np.uint8)
        labels[2:9, 2:9], labels[10:14, 5:15] = 1, 2
        save(root / "images" / f"c{i}.bmp", noise())
        save(root / "masks" / f"c{i}.png", np.asarray(colours, np.uint8)[labels])
    with pytest.raises(ImageDecodeError, match="colour mask; set class_colors"):
        prepare("seg_folder", root, tmp_path / "data")
    names = ("background", "red", "green")
    builder = prepare(
        "seg_folder", root, tmp_path / "data", class_colors=colours, class_names=names, image_size=8,
        split_fractions=(0.5, 0.25, 0.25),
    )  # fmt: skip
    masks = np.stack([e["mask"] for rows in read(builder).values() for e in rows])
    assert masks.shape == (4, 8, 8, 1) and set(np.unique(masks)) == {0, 1, 2}
    assert builder.info.metadata["segmentation"]["class_names"] == list(names)


def test_label_mapping_rules_and_palette_masks(tmp_path):
    def hist(counts: dict) -> np.ndarray:
        out = np.zeros(256, np.int64)
        out[list(counts)] = list(counts.values())
        return out

    assert seg.label_mapping(hist({0: 9, 255: 1}), "auto")[0] == {0: 0, 255: 1}
    assert seg.label_mapping(hist({0: 9, 1: 1}), "auto")[0] is None  # Already a label map.
    assert seg.label_mapping(hist({0: 9, 2: 1, 7: 1}), "auto")[0] is None
    grey = hist({0: 9, 85: 3, 170: 3, 255: 3})
    assert seg.label_mapping(grey, "auto")[0] == {0: 0, 85: 1, 170: 2, 255: 3}
    assert seg.label_mapping(hist({0: 9, 3: 1, 250: 1, 255: 5}), "binary")[0] == {0: 0, 3: 0, 250: 1, 255: 1}
    # JPEG smear: many grey levels near 0 and 255, almost nothing in the middle of the range.
    jpeg = hist({0: 900, **dict.fromkeys(range(1, 12), 3), **dict.fromkeys(range(244, 255), 3), 255: 300})
    mapping, rule = seg.label_mapping(jpeg, "auto")
    assert mapping[11] == 0 and mapping[244] == 1 and "JPEG" in rule
    indices = np.array([[0, 1], [2, 1]], np.uint8)
    save(tmp_path / "p.png", indices, "P", palette=[0, 0, 0, 255, 0, 0, 0, 255, 0])
    np.testing.assert_array_equal(seg.decode_mask_file(tmp_path / "p.png"), indices)
    with pytest.raises(ImageDecodeError, match=r"colour \(9, 9, 9\) at row 0, column 1"):
        seg.colours_to_labels(np.array([[[0, 0, 0], [9, 9, 9]]], np.uint8), [(0, 0, 0)], "m.png")


def write_drive(root):
    """40 tiny DRIVE cases: FOV = left 15 columns, vessels = rows 0-3, 2nd observer = rows 0-1 (palette)."""
    fov, vessels, second = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
    fov[:, :15], vessels[:4], second[:2] = 255, 255, 1
    for kind, cases in (("training", range(21, 41)), ("test", range(1, 21))):
        for c in cases:
            save(root / kind / "images" / f"{c:02d}_{kind}.tif", noise())
            save(root / kind / "1st_manual" / f"{c:02d}_manual1.gif", vessels)
            save(root / kind / "mask" / f"{c:02d}_{kind}_mask.gif", fov)
            if kind == "test":
                palette = [0, 0, 0, 255, 255, 255]
                save(root / kind / "2nd_manual" / f"{c:02d}_manual2.gif", second, "P", palette)


def test_drive_layout_fov_as_valid_second_observer_and_seeded_validation(tmp_path):
    write_drive(tmp_path / "manual" / "DRIVE")
    builder = prepare("drive", tmp_path / "manual", tmp_path / "data", num_validation=4, seed=1)
    examples = read(builder)
    assert {s: len(v) for s, v in examples.items()} == {"train": 16, "validation": 4, "test": 20}
    held = builder.info.metadata["validation_cases"]
    assert sorted(e["case_id"].decode() for e in examples["validation"]) == held
    assert held == sorted(str(21 + i) for i in np.random.default_rng(1).permutation(20)[:4])
    test = examples["test"][0]
    assert test["valid"][:, :15].all() and not test["valid"][:, 15:].any()
    assert int(test["mask"].sum()) == 4 * W and int(test["second_observer"].sum()) == 2 * W
    assert not examples["train"][0]["second_observer"].any()
    meta = builder.info.metadata["segmentation"]
    assert meta["pixel_counts"]["test"] == [20 * 12 * 15, 20 * 4 * 15]  # Inside the FOV only.
    assert meta["second_observer_splits"] == ["test"]
    cfg = data_config(
        **{
            "name": "drive", "data_dir": str(tmp_path / "data"), "manual_dir": str(tmp_path / "manual"),
            "builder_kwargs": {"num_validation": 4, "seed": 1}, "channels": 3, "eval_batch_size": 8,
            "num_workers": 0, "pad_multiple": 8, "normalize": {"mean": 0.0, "std": 1.0},
        }
    )  # fmt: skip
    batch = next(pipeline.iterate_eval(cfg, split="test"))  # The 2nd observer reaches evaluation, padded.
    assert batch["second_observer"].shape == (8, H, 24) and batch["second_observer"].dtype == np.int32
    assert batch["second_observer"][:, :2, :W].all() and not batch["second_observer"][:, 2:].any()
    assert batch["valid"][:, :, :15].all() and not batch["valid"][:, :, 15:].any()
    (tmp_path / "manual" / "DRIVE" / "test" / "mask" / "07_test_mask.gif").unlink()
    with pytest.raises(DatasetLayoutError, match="07_test_mask.gif"):
        prepare("drive", tmp_path / "manual", tmp_path / "data", num_validation=3)


def test_drive_cross_validation_folds_partition_the_training_images(tmp_path):
    train = [str(c) for c in range(21, 41)]
    folds = [builders.check_kwargs("drive", {"cv_folds": 5, "cv_fold": k, "seed": 1}) for k in range(5)]
    held = [cfg.validation_cases(train) for cfg in folds]
    assert [len(h) for h in held] == [4] * 5 and sorted(c for h in held for c in h) == train  # Once each.
    plain = builders.check_kwargs("drive", {"num_validation": 4, "seed": 1}).validation_cases(train)
    assert plain == held[0]  # Fold 0 of 5 is the recipe's own validation split.
    write_drive(tmp_path / "manual")
    builder = prepare("drive", tmp_path / "manual", tmp_path / "data", cv_folds=3, cv_fold=2, seed=1)
    examples = read(builder)
    assert {s: len(v) for s, v in examples.items()} == {"train": 14, "validation": 6, "test": 20}
    three = builders.check_kwargs("drive", {"cv_folds": 3, "cv_fold": 2, "seed": 1}).validation_cases(train)
    assert sorted(e["case_id"].decode() for e in examples["validation"]) == three
    with pytest.raises(ValueError, match="cv_fold < cv_folds, got 3, 3"):
        builders.check_kwargs("drive", {"cv_folds": 3, "cv_fold": 3})


def write_nifti(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data, np.diag([0.7, 0.8, 2.5, 1.0]) if affine is None else affine).to_filename(path)


def test_synapse_case_list_organ_mapping_window_and_spacing(tmp_path):
    root = tmp_path / "manual" / "RawData" / "Training"
    image = np.full((14, 5, 2), 75, np.int16)
    image[0, 0, :], image[1, 0, :] = -200, 400
    label = np.zeros((14, 5, 2), np.uint8)
    label[:, 0, 0] = np.arange(14)  # Every raw BTCV label once, on row 0 of slice 0.
    for case in (*range(1, 11), *range(21, 41)):
        write_nifti(root / "img" / f"img{case:04d}.nii.gz", image)
        write_nifti(root / "label" / f"label{case:04d}.nii.gz", label)
    write_nifti(tmp_path / "manual" / "RawData" / "Testing" / "img" / "img0061.nii.gz", image)
    builder = prepare("nifti_volumes", tmp_path / "manual", tmp_path / "data", layout="synapse")
    examples = read(builder)
    assert {s: len(v) for s, v in examples.items()} == {"train": 32, "validation": 4, "test": 24}
    cases = builder.info.metadata["cases"]
    assert cases["test"] == [f"case{c:04d}" for c in (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)]
    assert len(cases["train"]) == 16 and not set(cases["train"]) & set(cases["validation"])
    first = examples["test"][0]
    assert first["case_id"] == b"case0001" and first["slice_index"] == 0
    np.testing.assert_array_equal(first["mask"][0, :, 0], [0, 7, 4, 3, 2, 0, 5, 8, 1, 0, 0, 6, 0, 0])
    assert first["image"].shape == (5, 14, 1)
    assert list(first["image"][0, :3, 0]) == [0, 255, 128] and first["image"][1, 0, 0] == 128
    np.testing.assert_allclose(first["spacing"], [0.8, 0.7, 2.5])
    assert builder.info.metadata["segmentation"]["class_names"][1:] == [
        "aorta", "gallbladder", "left_kidney", "right_kidney", "liver", "pancreas", "spleen", "stomach",
    ]  # fmt: skip


def write_acdc(root, patients):
    image = np.arange(6 * 5 * 2, dtype=np.float32).reshape(6, 5, 2)
    label = np.zeros((6, 5, 2), np.uint8)
    label[1:3, 1:4, 1] = 3
    for folder, numbers in patients.items():
        for n in numbers:
            for frame in (1, 12):
                base = root / folder / f"patient{n:03d}" / f"patient{n:03d}_frame{frame:02d}"
                write_nifti(base.with_name(base.name + ".nii.gz"), image)
                write_nifti(base.with_name(base.name + "_gt.nii.gz"), label)


def test_acdc_patients_stay_together_percentile_and_mismatch_errors(tmp_path):
    root = tmp_path / "manual" / "database"
    write_acdc(root, {"training": (1, 2, 3), "testing": (101, 102)})
    builder = prepare(
        "nifti_volumes", tmp_path / "manual", tmp_path / "data", layout="acdc", validation_fraction=0.34,
        percentiles=(0.0, 100.0), slices="foreground",
    )  # fmt: skip
    examples = read(builder)
    # 2/1 training patients x 2 frames, one labelled slice each; test keeps both slices of 4 volumes.
    assert {s: len(v) for s, v in examples.items()} == {"train": 4, "validation": 2, "test": 8}
    patients = {s: {e["case_id"].decode()[:10] for e in v} for s, v in examples.items()}
    assert not patients["train"] & patients["validation"] and patients["test"] == {"patient101", "patient102"}
    volume = np.concatenate([e["image"].ravel() for e in examples["test"][:2]])
    assert volume.min() == 0 and volume.max() == 255
    assert builder.info.metadata["segmentation"]["class_names"] == ["background", "RV", "MYO", "LV"]
    gt = root / "training" / "patient002" / "patient002_frame12_gt.nii.gz"
    write_nifti(gt, np.zeros((6, 4, 2), np.uint8))
    with pytest.raises(DatasetLayoutError, match=r"frame12.nii.gz has shape \(6, 5, 2\) but label"):
        prepare("nifti_volumes", tmp_path / "manual", tmp_path / "data", layout="acdc")
    write_nifti(gt, np.zeros((6, 5, 2), np.uint8), affine=np.diag([0.7, 0.8, 5.0, 1.0]))
    with pytest.raises(DatasetLayoutError, match="patient002_frame12_gt.nii.gz have different affines"):
        prepare("nifti_volumes", tmp_path / "manual", tmp_path / "data", layout="acdc")


def test_msd_and_nnunet_dataset_json_channels_and_spacing_resample(tmp_path):
    task = tmp_path / "msd" / "Task02_Heart"
    image = np.zeros((4, 6, 3, 2), np.float32)
    image[..., 1] = np.arange(4 * 6 * 3).reshape(4, 6, 3)
    label = np.zeros((4, 6, 3), np.uint8)
    label[1:3, 2:5, :] = 1
    entries = []
    for i in range(5):
        write_nifti(task / "imagesTr" / f"la_{i:03d}.nii.gz", image, np.diag([0.5, 0.5, 2.0, 1.0]))
        write_nifti(task / "labelsTr" / f"la_{i:03d}.nii.gz", label, np.diag([0.5, 0.5, 2.0, 1.0]))
        entries.append({"image": f"./imagesTr/la_{i:03d}.nii.gz", "label": f"./labelsTr/la_{i:03d}.nii.gz"})
    (task / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "left atrium"}, "training": entries})
    )
    builder = prepare(
        "nifti_volumes", tmp_path / "msd", tmp_path / "data", layout="msd", channel=1, resample="spacing",
        split_fractions=(0.6, 0.2, 0.2),
    )  # fmt: skip
    examples = read(builder)
    assert {s: len(v) for s, v in examples.items()} == {"train": 9, "validation": 3, "test": 3}
    e = examples["train"][0]
    assert e["image"].shape == (3, 2, 1) and e["image"].max() > 0  # 6x4 voxels of 0.5 mm -> 3x2 of 1 mm.
    assert set(np.unique(e["mask"])) <= {0, 1}
    np.testing.assert_allclose(e["spacing"], [1.0, 1.0, 2.0])
    assert builder.info.metadata["segmentation"]["class_names"] == ["background", "left atrium"]

    v2 = tmp_path / "nnunet" / "Dataset001_X"
    for i in range(3):
        write_nifti(v2 / "imagesTr" / f"x_{i:03d}_0000.nii.gz", image[..., 0])
        write_nifti(v2 / "labelsTr" / f"x_{i:03d}.nii.gz", label)
    v2_json = {"labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"}
    (v2 / "dataset.json").write_text(json.dumps(v2_json))
    builder = prepare("nifti_volumes", tmp_path / "nnunet", tmp_path / "data", layout="msd")
    cases = sorted(c for split_cases in builder.info.metadata["cases"].values() for c in split_cases)
    assert cases == ["x_000", "x_001", "x_002"]


DRIVE = shared_data_dir() / "drive"


@pytest.mark.real_data
@pytest.mark.skipif(not DRIVE.is_dir(), reason=f"DRIVE not found at {DRIVE}")
def test_real_drive_counts_fov_and_second_observer_human_level(tmp_path):
    builder = prepare("drive", DRIVE, tmp_path / "data")
    counts = {split: info.num_examples for split, info in builder.info.splits.items()}
    assert counts == {"train": 16, "validation": 4, "test": 20}
    meta = builder.info.metadata["segmentation"]
    fov = meta["valid_pixels"]["test"] / (20 * 584 * 565)
    vessels = meta["pixel_counts"]["test"][1] / meta["valid_pixels"]["test"]
    assert 0.6 < fov < 0.75 and 0.1 < vessels < 0.15, (fov, vessels)
    agree = total = 0
    for e in read(builder)["test"]:
        assert e["image"].shape == (584, 565, 3) and set(np.unique(e["mask"])) == {0, 1}
        inside = e["valid"][..., 0].astype(bool)
        agree += int((e["mask"][..., 0] == e["second_observer"][..., 0])[inside].sum())
        total += int(inside.sum())
    assert agree / total == pytest.approx(0.9473, abs=5e-4)  # The published 2nd observer accuracy, 0.947.


def test_kvasir_like_jpeg_masks_need_no_options_and_max_size_keeps_aspect(tmp_path):
    root = tmp_path / "Kvasir-SEG"
    for i in range(3):
        save(root / "images" / f"cju{i}.jpg", noise((40, 60, 3)))
        mask = np.zeros((40, 60), np.uint8)
        mask[10:30, 20:50] = 255
        save(root / "masks" / f"cju{i}.jpg", mask)  # JPEG smears 0/255 into many grey levels.
    builder = prepare("seg_folder", tmp_path, tmp_path / "data", root="Kvasir-SEG", max_size=30)
    assert "JPEG-compressed" in builder.info.metadata["preparation"]["label_rule"]
    examples = [e for rows in read(builder).values() for e in rows]
    assert len(examples) == 3 and all(e["mask"].shape == (20, 30, 1) for e in examples)
    reference = np.zeros((20, 30), np.uint8)
    reference[5:15, 10:25] = 1
    for e in examples:
        assert (e["mask"][..., 0] != reference).mean() < 0.02  # Only a few edge pixels differ.


def test_segmentation_preparation_never_imports_tensorflow():
    assert "tensorflow" not in sys.modules
