"""The real-dataset TFDS builders, prepared from tiny generated archives laid out like the public ones.

Every archive is written with Pillow/pydicom into tmp_path, prepared at 32x32 and read back with
``as_data_source()`` (no TensorFlow), checking counts, labels, shapes and that duplicates never straddle.
"""

import json
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from medjax.data import builders, splits
from medjax.data.builders import (
    _folder,
    brain_mri,
    chest_xray,
    covid_ct_slices,
    image_folder,
    medmnist,
    monkeypox,
    sars_cov2_ct,
    ucsd_covid_ct,
)
from medjax.data.images import ImageDecodeError
from tests.test_images import write_dicom

RNG = np.random.default_rng(0)


def noise(shape) -> np.ndarray:
    """A fresh random image: distinct files never collide into one duplicate group."""
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def write_images(folder, count, *, prefix="img", suffix=".png", mode="RGB", size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else (4,) if mode == "RGBA" else ())
    for i in range(count):
        Image.fromarray(noise(shape), mode).save(folder / f"{prefix} ({i + 1}){suffix}")


def prepare(module, manual_dir, data_dir, **builder_kwargs):
    config = module.Builder.make_config(image_size=32, **builder_kwargs)
    builder = module.Builder(data_dir=str(data_dir), config=config, num_workers=2)
    builder.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def read(builder) -> dict[str, list[dict]]:
    sources = builder.as_data_source()
    return {split: [source[i] for i in range(len(source))] for split, source in sources.items()}


def split_of(examples) -> dict[str, str]:
    return {_text(e["id"]): split for split, rows in examples.items() for e in rows}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture
def sars_archive(tmp_path):
    """COVID/ and non-COVID/ (RGB and RGBA), OS litter, and two byte-identical copies inside COVID/."""
    root = tmp_path / "manual"
    write_images(root / "COVID", 15, prefix="Covid")
    write_images(root / "COVID", 5, prefix="CovidA", mode="RGBA")
    write_images(root / "non-COVID", 20, prefix="Non-Covid")
    shutil.copy(root / "COVID" / "Covid (1).png", root / "COVID" / "Covid (99).png")
    shutil.copy(root / "COVID" / "Covid (2).png", root / "COVID" / "Covid (98).png")
    (root / "COVID" / ".DS_Store").write_bytes(b"\0\1")
    (root / "non-COVID" / "Thumbs.db").write_bytes(b"\0\1")
    return root


def test_sars_cov2_ct_split_labels_shapes_and_duplicates(sars_archive, tmp_path):
    builder = prepare(sars_cov2_ct, sars_archive, tmp_path / "data", channels=1)
    examples = read(builder)
    assert builder.info.features["label"].names == ["non-COVID", "COVID"]
    # 22 COVID files (20 distinct + 2 copies): 15.4/2.2/4.4 -> 16/2/4 (tie to train); 20 non-COVID: 14/2/4.
    assert {s: len(rows) for s, rows in examples.items()} == {"train": 30, "validation": 4, "test": 8}
    for rows in examples.values():
        for e in rows:
            assert e["image"].shape == (32, 32, 1) and e["image"].dtype == np.uint8
            assert e["label"] == int(_text(e["id"]).startswith("COVID/"))
    where = split_of(examples)
    assert where["COVID/Covid (1).png"] == where["COVID/Covid (99).png"]
    assert where["COVID/Covid (2).png"] == where["COVID/Covid (98).png"]
    report = builder.info.metadata["preparation"]
    assert report["duplicate_groups"] == 2 and report["straddling_groups"] == 0
    assert sorted(report["ignored"]) == ["COVID/.DS_Store", "non-COVID/Thumbs.db"]
    assert json.loads((builder.data_path / "metadata.json").read_text())["preparation"]["items"] == 42


def test_same_kwargs_same_split_and_name_encodes_values(sars_archive, tmp_path):
    first = split_of(read(prepare(sars_cov2_ct, sars_archive, tmp_path / "a", seed=3)))
    second = split_of(read(prepare(sars_cov2_ct, sars_archive, tmp_path / "b", seed=3)))
    other = split_of(read(prepare(sars_cov2_ct, sars_archive, tmp_path / "c", seed=4)))
    assert first == second and first != other
    make = sars_cov2_ct.Builder.make_config
    assert make(image_size=32, seed=3).name == make(seed=3, image_size=32).name != make(image_size=32).name
    assert make(image_size=32, seed=3).name.startswith("image_size32-seed3-")
    assert make(split_fractions=[0.8, 0.2, 0]).split_fractions == (0.8, 0.2, 0.0)
    registry_builder = builders.get_builder(
        "sars_cov2_ct", data_dir=str(tmp_path / "b"), builder_kwargs={"seed": 3, "image_size": 32}
    )
    assert registry_builder.builder_config.name == make(image_size=32, seed=3).name  # One directory.
    with pytest.raises(ValueError, match=r"unknown builder_kwargs \['imagesize'\]; accepted: .*image_size"):
        make(imagesize=32)
    with pytest.raises(TypeError, match="skip_corrupt"):
        make(skip_corrupt="yes")


def kaggle_chest_xray(root):
    """The Kaggle zip: chest_xray/{train,test,val}, a nested chest_xray/chest_xray copy and __MACOSX."""
    for base in (root / "chest_xray", root / "chest_xray" / "chest_xray"):
        for cls in ("NORMAL", "PNEUMONIA"):
            write_images(base / "train" / cls, 10, suffix=".jpeg", mode="L")
            write_images(base / "test" / cls, 4, suffix=".jpeg", mode="L")
            write_images(base / "val" / cls, 2, suffix=".jpeg", mode="L")
    (root / "__MACOSX" / "chest_xray").mkdir(parents=True)
    (root / "__MACOSX" / "chest_xray" / "._x.jpeg").write_bytes(b"junk")
    return root / "chest_xray"


def test_chest_xray_carves_validation_and_reads_any_format(tmp_path):
    outer = kaggle_chest_xray(tmp_path / "manual")
    normal = outer / "train" / "NORMAL"
    Image.fromarray(noise((20, 30)).astype(np.uint16) * 200).save(normal / "sixteen_bit.png")
    write_dicom(normal / "scan.dcm", noise((16, 16)).astype(np.uint16) * 10, window=(1000, 2000))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(noise((10, 20, 3))).save(normal / "phone.jpeg", exif=exif)
    builder = prepare(chest_xray, tmp_path / "manual", tmp_path / "data")
    examples = read(builder)
    # Official val (2 per class) is tiny: merged into train (12 + 3 NORMAL extras, 12 PNEUMONIA), then 20 %
    # carved per class by largest remainder: NORMAL 15 -> 12/3, PNEUMONIA 12 -> 10/2 (9.6 rounds up).
    assert {s: len(rows) for s, rows in examples.items()} == {"train": 22, "validation": 5, "test": 8}
    assert examples["test"][0]["image"].shape == (32, 32, 3)
    report = builder.info.metadata["preparation"]
    assert report["root"] == "chest_xray" and "chest_xray" in report["ignored"]
    assert report["validation_source"].startswith("carved from train (4 official")
    assert all(not i.startswith("chest_xray/chest_xray") for i in split_of(examples))


def test_chest_xray_keeps_a_large_official_validation(tmp_path):
    root = tmp_path / "manual"
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        for cls in ("NORMAL", "PNEUMONIA"):
            write_images(root / split / cls, n, mode="L")
    counts = {s: len(r) for s, r in read(prepare(chest_xray, root, tmp_path / "d", min_validation=5)).items()}
    assert counts == {"train": 12, "validation": 6, "test": 4}


def test_monkeypox_uses_originals_and_ignores_folds(tmp_path):
    root = tmp_path / "manual"
    originals = root / "Original Images" / "Original Images"
    write_images(originals / "Monkey Pox", 6, suffix=".jpg")
    write_images(originals / "Others", 7, suffix=".jpg")
    augmented = root / "Augmented Images" / "Augmented Images"
    write_images(augmented / "Monkeypox_augmented", 12, suffix=".jpg")
    write_images(augmented / "Others_augmented", 14, suffix=".jpg")
    for split in ("Train", "Val", "Test"):
        write_images(root / "Fold1" / "Fold1" / "Fold1" / split / "Monkeypox", 2, suffix=".jpg")
    (root / "Monkeypox_fold1.csv").write_text("image,label\n")
    builder = prepare(monkeypox, root, tmp_path / "data")
    examples = read(builder)
    assert sum(len(r) for r in examples.values()) == 13
    assert builder.info.features["label"].names == ["Others", "Monkey Pox"]
    assert all(e["label"] == ("Monkey Pox" in _text(e["id"])) for rows in examples.values() for e in rows)
    augmented_builder = prepare(monkeypox, root, tmp_path / "data", use_augmented=True)
    assert sum(len(r) for r in read(augmented_builder).values()) == 26


def test_covid_ct_slices_nested_numbered_folders(tmp_path):
    root = tmp_path / "manual" / "curated_data" / "curated_data"
    for i, folder in enumerate(("1NonCOVID", "2COVID", "3CAP")):
        write_images(root / folder, 10 + i, mode="L")
    builder = prepare(covid_ct_slices, tmp_path / "manual", tmp_path / "data")
    examples = read(builder)
    assert builder.info.features["label"].names == ["Normal", "COVID", "CAP"]
    labels = {e["label"]: _text(e["id"]).split("/")[0] for rows in examples.values() for e in rows}
    assert labels == {0: "1NonCOVID", 1: "2COVID", 2: "3CAP"}
    assert builder.info.metadata["preparation"]["counts"]["test"] == {"Normal": 2, "COVID": 2, "CAP": 2}


def test_ucsd_covid_ct_keeps_the_official_split_of_mixed_formats(tmp_path):
    root = tmp_path / "manual" / "COVID-CT"
    for split, n in (("train", 4), ("val", 3), ("test", 2)):
        write_images(root / split / "CT_COVID", n, mode="RGBA", size=(53, 70))
        write_images(root / split / "CT_NonCOVID", n, suffix=".jpg", mode="L", size=(300, 200))
    builder = prepare(ucsd_covid_ct, tmp_path / "manual", tmp_path / "data", channels=3)
    examples = read(builder)
    assert builder.info.features["label"].names == ["CT_NonCOVID", "CT_COVID"]
    assert {s: len(r) for s, r in examples.items()} == {"train": 8, "validation": 6, "test": 4}
    assert all(e["label"] == ("CT_COVID/" in _text(e["id"])) for rows in examples.values() for e in rows)
    assert all(e["image"].shape == (32, 32, 3) for rows in examples.values() for e in rows)


def test_brain_mri_four_class_aliases_and_binary(tmp_path):
    four = tmp_path / "four"
    for split, n in (("Training", 5), ("Testing", 2)):
        for cls in ("glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"):
            write_images(four / split / cls, n, suffix=".jpg", mode="L")
    examples = read(prepare(brain_mri, four, tmp_path / "data", validation_fraction=0.2))
    assert {s: len(r) for s, r in examples.items()} == {"train": 16, "validation": 4, "test": 8}
    assert sorted({e["label"] for e in examples["test"]}) == [0, 1, 2, 3]
    binary = tmp_path / "binary"
    write_images(binary / "yes", 10, mode="L")
    write_images(binary / "no", 10, mode="L")
    builder = prepare(brain_mri, binary, tmp_path / "data", variant="binary")
    assert builder.info.features["label"].names == ["no", "yes"]
    assert {s: len(r) for s, r in read(builder).items()} == {"train": 14, "validation": 2, "test": 4}


def test_image_folder_discovers_sorted_classes_under_root(tmp_path):
    root = tmp_path / "manual" / "project" / "images"
    write_images(root / "zebra", 10)
    write_images(root / "ant", 10)
    builder = prepare(image_folder, tmp_path / "manual", tmp_path / "data", root="project")
    assert builder.info.features["label"].names == ["ant", "zebra"]
    reloaded = image_folder.Builder(data_dir=str(tmp_path / "data"), config=builder.builder_config)
    assert reloaded.info.features["label"].names == ["ant", "zebra"]  # Names persist with the data.
    ordered = prepare(
        image_folder, tmp_path / "manual", tmp_path / "data", root="project", classes=("Zebra", "Ant")
    )
    assert ordered.info.features["label"].names == ["Zebra", "Ant"]  # Matched ignoring case.
    assert all(e["label"] == _text(e["id"]).startswith("ant") for e in read(ordered)["train"])


def test_image_folder_unlabelled_reads_every_image_below_root_as_one_class(tmp_path):
    root = tmp_path / "manual" / "scans"
    write_images(root, 4, prefix="top")
    write_images(root / "patient_1" / "series_a", 8, prefix="a")  # Any folder names, any depth.
    write_images(root / "patient_2", 8, prefix="b", mode="L")
    (root / "notes.txt").write_text("not an image")
    builder = prepare(
        image_folder,
        tmp_path / "manual",
        tmp_path / "data",
        root="scans",
        unlabelled=True,
        split_fractions=(0.75, 0.25, 0.0),
        skip_corrupt=True,
    )
    assert builder.info.features["label"].names == ["image"]
    examples = read(builder)
    assert {s: len(r) for s, r in examples.items()} == {"train": 15, "validation": 5}
    report = builder.info.metadata["preparation"]
    assert [e["id"] for e in report["skipped_corrupt"]] == ["notes.txt"]
    assert report["ignored"] == []  # Sub-folders are read, not ignored.
    with pytest.raises(ValueError, match="unlabelled"):
        image_folder.Builder.make_config(unlabelled=True, classes=("a",))


def write_npz(path, *, sizes=(6, 2, 3), image_shape=(28, 28), label_shape=lambda n: (n, 1), classes=2):
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        arrays[f"{split}_images"] = noise((n, *image_shape))
        arrays[f"{split}_labels"] = np.resize(np.arange(n) % classes, label_shape(n)).astype(np.uint8)
    np.savez(path, **arrays)


def test_medmnist_shapes_labels_and_official_split(tmp_path):
    write_npz(tmp_path / "pneumoniamnist.npz")
    write_npz(tmp_path / "bloodmnist_64.npz", image_shape=(64, 64, 3), label_shape=lambda n: (n,), classes=8)
    builder = prepare(medmnist, tmp_path, tmp_path / "data")
    examples = read(builder)
    assert {s: len(r) for s, r in examples.items()} == {"train": 6, "validation": 2, "test": 3}
    assert builder.info.features["label"].names == ["normal", "pneumonia"]
    assert sorted(e["label"] for e in examples["test"]) == [0, 0, 1]  # TFDS shuffles within a split.
    blood = prepare(
        medmnist, tmp_path, tmp_path / "data", subset="bloodmnist", npz="bloodmnist_64.npz", channels=3
    )
    assert read(blood)["train"][0]["image"].shape == (32, 32, 3)
    assert blood.info.features["label"].num_classes == 8
    write_npz(tmp_path / "newmnist.npz", classes=3)
    other = prepare(medmnist, tmp_path, tmp_path / "data", subset="newmnist")
    assert other.info.features["label"].names == ["class_0", "class_1", "class_2"]


def test_medmnist_rejects_multilabel_subsets(tmp_path):
    write_npz(tmp_path / "chestmnist.npz", label_shape=lambda n: (n, 14))
    with pytest.raises(_folder.DatasetLayoutError, match=r"chestmnist.npz: train_labels has shape \(6, 14\)"):
        prepare(medmnist, tmp_path, tmp_path / "data", subset="chestmnist")


@pytest.mark.parametrize(
    "bad_name, payload", [("x (9).png", b"\x89PNG\r\n\x1a\n trunc"), ("notes.txt", b"hello")]
)
def test_corrupt_files_fail_loudly_or_are_skipped_and_reported(sars_archive, tmp_path, bad_name, payload):
    (sars_archive / "non-COVID" / bad_name).write_bytes(payload)
    with pytest.raises(ImageDecodeError, match="Expected layout") as info:
        prepare(sars_cov2_ct, sars_archive, tmp_path / "data")
    assert str(sars_archive / "non-COVID" / bad_name) in str(info.value)
    builder = prepare(sars_cov2_ct, sars_archive, tmp_path / "data", skip_corrupt=True)
    skipped = builder.info.metadata["preparation"]["skipped_corrupt"]
    assert [s["id"] for s in skipped] == [f"non-COVID/{bad_name}"]
    assert sum(len(r) for r in read(builder).values()) == 42


def test_layout_errors_name_the_path_and_layout(sars_archive, tmp_path):
    empty = sars_archive / "non-COVID"
    shutil.rmtree(empty)
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"")
    with pytest.raises(_folder.DatasetLayoutError, match=r"empty class folder .*non-COVID[\s\S]*COVID/Covid"):
        prepare(sars_cov2_ct, sars_archive, tmp_path / "data")
    shutil.rmtree(empty)
    with pytest.raises(_folder.DatasetLayoutError, match=r"missing class folder\(s\) \['non-COVID'\]"):
        prepare(sars_cov2_ct, sars_archive, tmp_path / "data")
    wrong = tmp_path / "wrong"
    write_images(wrong / "images", 3)
    with pytest.raises(_folder.DatasetLayoutError, match=f"no split or class folders .*{wrong}"):
        prepare(sars_cov2_ct, wrong, tmp_path / "data")
    with pytest.raises(_folder.DatasetLayoutError, match=f"{tmp_path / 'absent'}.*does not exist"):
        prepare(sars_cov2_ct, tmp_path / "absent", tmp_path / "data")


def test_interrupted_preparation_does_not_look_complete(sars_archive, tmp_path, monkeypatch):
    original = _folder.MedicalImageBuilder._generate_examples

    def fail_midway(self, records, spill):
        for i, example in enumerate(original(self, records, spill)):
            if i == 3:
                raise KeyboardInterrupt("simulated interruption")
            yield example

    monkeypatch.setattr(_folder.MedicalImageBuilder, "_generate_examples", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare(sars_cov2_ct, sars_archive, tmp_path / "data")
    monkeypatch.undo()
    config = sars_cov2_ct.Builder.make_config(image_size=32)
    fresh = sars_cov2_ct.Builder(data_dir=str(tmp_path / "data"), config=config)
    assert not fresh.is_prepared()
    assert not fresh.data_path.exists() and not list((tmp_path / "data").rglob("incomplete*"))
    with pytest.raises(NotImplementedError):  # TFDS finds no prepared files to read.
        fresh.as_data_source()
    assert sum(len(r) for r in read(prepare(sars_cov2_ct, sars_archive, tmp_path / "data")).values()) == 42


def test_preparation_never_imports_tensorflow():
    assert "tensorflow" not in sys.modules


def test_largest_remainder_and_stratified_random_split():
    assert splits.largest_remainder(12, [0.7, 0.1, 0.2]) == [9, 1, 2]  # 8.4/1.2/2.4: the tie goes to train.
    assert splits.largest_remainder(7, [0.5, 0.5]) == [4, 3]
    labels = [0] * 60 + [1] * 40
    plan = splits.plan_splits(labels=labels, hashes=[str(i) for i in range(100)], seed=1)
    assert plan.report["counts"] == {
        "train": {0: 42, 1: 28},
        "validation": {0: 6, 1: 4},
        "test": {0: 12, 1: 8},
    }
    again = splits.plan_splits(labels=labels, hashes=[str(i) for i in range(100)], seed=1)
    other = splits.plan_splits(labels=labels, hashes=[str(i) for i in range(100)], seed=2)
    assert plan.assignment == again.assignment != other.assignment
    with pytest.raises(ValueError, match="sum to 1"):
        splits.plan_splits(labels=labels, hashes=[str(i) for i in range(100)], fractions={"train": 0.5})


def test_duplicate_groups_never_straddle_drawn_splits():
    hashes = [str(i // 3) for i in range(90)] + [str(i) for i in range(100, 130)]  # 30 triples, 30 singles.
    labels = [(i // 3) % 2 for i in range(90)] + [i % 2 for i in range(30)]
    plan = splits.plan_splits(
        labels=labels, hashes=hashes, fractions={"train": 0.8, "validation": 0.2}, seed=0
    )
    for group in range(30):
        assert len({plan.assignment[3 * group + k] for k in range(3)}) == 1
    assert (
        plan.report["duplicate_groups"],
        plan.report["duplicate_items"],
        plan.report["straddling_groups"],
    ) == (
        30,
        60,
        0,
    )
    assert set(plan.assignment) == {"train", "validation"}


def test_official_splits_kept_tiny_validation_carved_and_leaks_dropped():
    official = ["train"] * 20 + ["validation"] * 2 + ["test"] * 4
    hashes = [f"h{i}" for i in range(26)]
    hashes[25] = hashes[0]  # A train image duplicated in test, with another label.
    labels = [i % 2 for i in range(26)]
    plan = splits.plan_splits(labels=labels, hashes=hashes, official=official, validation_fraction=0.25)
    assert plan.assignment[22:] == ("test",) * 4  # Official test untouched.
    assert plan.report["validation_source"].startswith("carved from train (2 official")
    assert sum(a == "validation" for a in plan.assignment) == 6  # 25 % of the 22 train+val items, per class.
    assert (plan.report["straddling_groups"], plan.report["label_conflict_groups"]) == (1, 1)
    dropped = splits.plan_splits(labels=labels, hashes=hashes, official=official, drop_duplicates=True)
    assert dropped.assignment[0] is None and dropped.assignment[25] == "test"  # The held-out copy stays.
    assert (dropped.report["duplicates_dropped"], dropped.report["straddling_groups"]) == (1, 0)
    kept = splits.plan_splits(labels=labels, hashes=hashes, official=official, validation_fraction=None)
    assert kept.assignment == tuple(official)
