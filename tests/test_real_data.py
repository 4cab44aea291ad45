"""The builders on the real datasets in ../shared/data (skipped when absent): counts pinned to the README.

Also pins facts of those files found while writing the builders: PneumoniaMNIST has 8 pixel-identical
groups straddling its official train/val split, BreastMNIST one train/test group with conflicting labels
and 181 near-duplicate pairs (re-encoded copies, 1-3 grey levels apart), 99 of them across its official
splits; the Kermany train+test folders hold 30 duplicate groups (32 extra copies), none across splits,
and no near-duplicate; its validation split, carved by patient, shares no patient with train.
"""

import time

import pytest
import tensorflow_datasets as tfds

from medjax.data.builders import _folder, chest_xray, medmnist, ucsd_covid_ct
from tests.conftest import shared_data_dir

DATA = shared_data_dir()
pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}"),
]


def prepare(module, manual_dir, data_dir, **builder_kwargs):
    builder = module.Builder(data_dir=str(data_dir), config=module.Builder.make_config(**builder_kwargs))
    start = time.perf_counter()
    builder.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    print(f"{builder.name}/{builder.builder_config.name}: prepared in {time.perf_counter() - start:.1f} s")
    return builder


@pytest.mark.parametrize(
    "subset, counts, straddling, conflicts, near",
    [
        (
            "pneumoniamnist",
            {
                "train": {"normal": 1214, "pneumonia": 3494},
                "validation": {"normal": 135, "pneumonia": 389},
                "test": {"normal": 234, "pneumonia": 390},
            },
            8,
            0,
            (0, 0),
        ),
        (
            "breastmnist",  # This copy stores labels 1-D.
            {
                "train": {"malignant": 147, "normal, benign": 399},
                "validation": {"malignant": 21, "normal, benign": 57},
                "test": {"malignant": 42, "normal, benign": 114},
            },
            1,
            1,
            (181, 99),
        ),
    ],
)
def test_medmnist_official_counts(tmp_path, subset, counts, straddling, conflicts, near):
    builder = prepare(medmnist, DATA / subset, tmp_path, subset=subset)
    report = builder.info.metadata["preparation"]
    assert report["counts"] == counts
    assert (report["straddling_groups"], report["label_conflict_groups"]) == (straddling, conflicts)
    assert (report["near_duplicate_pairs"], report["straddling_near_duplicate_pairs"]) == near
    sources = builder.as_data_source()
    assert {s: len(v) for s, v in sources.items()} == {s: sum(c.values()) for s, c in counts.items()}
    assert sources["test"][0]["image"].shape == (28, 28, 1)


@pytest.mark.slow
def test_ucsd_covid_ct_official_split(tmp_path):
    """About 10 s on 2 shared cores (746 PNG/JPEG slices up to 1408 px)."""
    builder = prepare(ucsd_covid_ct, DATA / "ucsd_covid_ct", tmp_path, image_size=32)
    assert builder.info.metadata["preparation"]["counts"] == {
        "train": {"CT_NonCOVID": 234, "CT_COVID": 191},
        "validation": {"CT_NonCOVID": 58, "CT_COVID": 60},
        "test": {"CT_NonCOVID": 105, "CT_COVID": 98},
    }


def test_chest_xray_kermany(tmp_path):
    """About 50 s on 2 quiet cores, 2 min on busy ones (5,840 JPEGs decoded, resized to 64, re-encoded)."""
    builder = prepare(chest_xray, DATA / "chest_xray", tmp_path, image_size=64)
    report = builder.info.metadata["preparation"]
    assert report["counts"] == {
        "train": {"NORMAL": 1073, "PNEUMONIA": 3099},  # 80 % of the official train, per class and patient.
        "validation": {"NORMAL": 268, "PNEUMONIA": 776},
        "test": {"NORMAL": 234, "PNEUMONIA": 390},  # Official test, untouched.
    }
    assert (report["duplicate_groups"], report["duplicate_items"], report["straddling_groups"]) == (30, 32, 0)
    assert (report["near_duplicate_pairs"], report["patients"], report["patients_with_several_images"]) == (
        0,
        3103,
        1184,
    )
    # Test reuses 170 training keys (other infection type; chest_xray's docstring), validation none.
    assert report["straddling_patients"] == 170
    sources = builder.as_data_source()
    split_of = {}
    for split, source in sources.items():
        for i in range(len(source)):
            example = source[i]
            assert example["image"].shape == (64, 64, 3)
            split_of[example["id"].decode() if isinstance(example["id"], bytes) else example["id"]] = split
    assert len(split_of) == 5840
    for group in report["duplicate_examples"]:
        assert len({split_of[i] for i in group}) == 1
    sides = {}
    for item, split in split_of.items():
        sides.setdefault(_folder.group_key(chest_xray.PATIENT_PATTERN, item), set()).add(split)
    assert not [key for key, s in sides.items() if {"train", "validation"} <= s]  # No patient crosses.
    assert sum(s == {"validation"} for s in sides.values()) > 500
