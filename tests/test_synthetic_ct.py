"""Dataset registry (names, kwargs -> configs, data_dir, prepare) and the generated ``synthetic_ct`` data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from medjax.data import builders
from medjax.data.builders import synthetic_ct

TINY = {"image_size": 32, "num_train": 40, "num_validation": 20, "num_test": 20}


def _records(data_dir, **kwargs):
    builder = builders.get_builder("synthetic_ct", data_dir=str(data_dir), builder_kwargs={**TINY, **kwargs})
    builders.prepare(builder)
    return {split: list(builder.as_data_source(split=split)) for split in ("train", "validation", "test")}


@pytest.fixture(scope="module")
def tiny(tfds_data_dir):
    return _records(tfds_data_dir)


def test_registry_lists_synthetic_ct_and_rejects_unknown_names():
    assert "synthetic_ct" in builders.available_datasets()
    assert not any(name.startswith("_") for name in builders.available_datasets())
    with pytest.raises(ValueError, match=r"'no_such_set'.*synthetic_ct"):
        builders.get_builder("no_such_set", data_dir="/unused")


def test_unknown_kwarg_is_named_and_accepted_ones_listed():
    with pytest.raises(ValueError, match=r"\['colour'\].*image_size.*lesion_contrast.*num_train"):
        builders.get_builder("synthetic_ct", data_dir="/unused", builder_kwargs={"colour": 1})


def test_config_name_is_deterministic_and_separates_kwargs(tmp_path):
    def data_dir(kwargs):
        return builders.get_builder("synthetic_ct", data_dir=str(tmp_path), builder_kwargs=kwargs).data_dir

    assert data_dir({"image_size": 32}) == data_dir({"image_size": 32})
    assert data_dir({}) == data_dir({"image_size": 64, "seed": 0})  # Spelled-out defaults are the defaults.
    assert data_dir({"image_size": 32}) != data_dir({"image_size": 32, "seed": 1})
    assert data_dir({"lesion_contrast": [0.06, 0.35]}) == data_dir({})  # A list spells the default tuple.
    assert builders.get_builder("synthetic_ct", data_dir=str(tmp_path)).builder_config.name.startswith(
        "default-"
    )
    # The readable part shows changed values; the digest covers all of them.
    name = builders.config_name({"a": 1, "b": (0.1, 0.2)}, {"a": 1, "b": (0.0, 0.2)})
    assert name.startswith("b0.1_0.2-") and len(name) == len("b0.1_0.2-") + 8


def test_default_data_dir_prefers_medjax_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDJAX_DATA_DIR", raising=False)
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    assert builders.default_data_dir().endswith("tensorflow_datasets")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    assert builders.default_data_dir() == str(tmp_path / "tfds")
    monkeypatch.setenv("MEDJAX_DATA_DIR", str(tmp_path / "medjax"))
    assert builders.default_data_dir() == str(tmp_path / "medjax")
    builder = builders.get_builder("synthetic_ct", data_dir=None)
    assert str(builder.data_dir).startswith(str(tmp_path / "medjax" / "synthetic_ct"))


def test_split_sizes_balance_and_feature_shapes(tiny):
    assert {split: len(records) for split, records in tiny.items()} == {
        "train": 40,
        "validation": 20,
        "test": 20,
    }
    for records in tiny.values():
        labels = np.array([r["label"] for r in records])
        assert labels.sum() * 2 == len(labels)  # Exactly balanced: label = index % 2.
        assert records[0]["image"].shape == records[0]["lesion_mask"].shape == (32, 32, 1)
        assert records[0]["image"].dtype == np.uint8
    assert tiny["test"][7]["id"] == b"test_000007"  # Stored in generation order.


def test_lesion_mask_nonempty_exactly_for_lesion_class(tiny):
    for records in tiny.values():
        for record in records:
            mask = record["lesion_mask"]
            assert set(np.unique(mask)) <= {0, 255}
            assert mask.any() == (record["label"] == 1), record["id"]


def test_preparation_is_deterministic_and_prefix_stable(tmp_path, tiny):
    again = _records(tmp_path / "again")
    grown = _records(tmp_path / "grown", num_train=44)
    for split in tiny:
        for a, b in zip(tiny[split], again[split], strict=True):
            assert a["id"] == b["id"]
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["lesion_mask"], b["lesion_mask"])
    # More training examples leave the first 40 (and the other splits) untouched.
    for a, b in zip(tiny["train"], grown["train"][:40], strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    reseeded = _records(tmp_path / "reseeded", seed=1)
    assert not np.array_equal(tiny["train"][0]["image"], reseeded["train"][0]["image"])


def test_rendered_lesions_lie_in_lungs_and_raise_intensity():
    brighter = 0
    for index in range(40):
        rng = np.random.default_rng([0, 0, index])
        image, lesion, lungs = synthetic_ct.render_slice(
            rng, size=48, lesion=True, lesion_contrast=(0.25, 0.3), lesion_radius=(0.08, 0.1)
        )
        assert lesion.any() and lungs.any()
        assert not (lesion & ~lungs).any()  # Every lesion pixel is a lung pixel.
        healthy_lung = (lungs > 0) & (lesion == 0)
        brighter += image[lesion > 0].mean() > image[healthy_lung].mean() + 0.08 * 255
    assert brighter == 40
    normal = synthetic_ct.render_slice(
        np.random.default_rng(1), size=48, lesion=False, lesion_contrast=(0.3, 0.3), lesion_radius=(0.1, 0.1)
    )
    assert not normal.lesion_mask.any()


class _FakeManual(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Reads one text file from the manual directory (stands in for a Kaggle-style dataset)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put labels.txt (one 0/1 label per line) here."
    fail_after: int | None = None  # Set by a test to simulate a crash mid-preparation.

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"label": tfds.features.ClassLabel(num_classes=2)})
        )

    def _split_generators(self, dl_manager):
        labels = (dl_manager.manual_dir / "labels.txt").read_text().split()
        return {"train": self._generate_examples(labels)}

    def _generate_examples(self, labels):
        for i, label in enumerate(labels):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("simulated crash")
            yield i, {"label": int(label)}


def test_manual_dataset_missing_files_error_quotes_instructions_and_path(tmp_path):
    manual = tmp_path / "manual"
    builder = _FakeManual(data_dir=str(tmp_path / "data"))
    with pytest.raises(builders.DatasetNotFoundError, match=r"(?s)Put labels\.txt.*" + str(manual)):
        builders.prepare(builder, manual_dir=str(manual))
    manual.mkdir()  # Empty is as bad as missing.
    with pytest.raises(builders.DatasetNotFoundError, match="missing or empty"):
        builders.prepare(builder, manual_dir=str(manual))
    (manual / "labels.txt").write_text("0 1 1\n")
    builders.prepare(builder, manual_dir=str(manual))
    assert [r["label"] for r in builder.as_data_source(split="train")] == [0, 1, 1]


def test_interrupted_preparation_never_looks_complete(tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "labels.txt").write_text("0 1 0 1\n")
    monkeypatch.setattr(_FakeManual, "fail_after", 2)
    builder = _FakeManual(data_dir=str(tmp_path / "data"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        builders.prepare(builder, manual_dir=str(manual))
    assert not builder.is_prepared()
    assert not any("incomplete" in p.name for p in (tmp_path / "data").rglob("*"))
    monkeypatch.setattr(_FakeManual, "fail_after", None)
    builder = _FakeManual(data_dir=str(tmp_path / "data"))
    builders.prepare(builder, manual_dir=str(manual))
    assert len(builder.as_data_source(split="train")) == 4
