"""Joint segmentation transforms and the pipeline's segmentation path (synthetic_ct with task='segmentation').

The transforms are pinned against numpy (a 90 degree rotation is ``np.rot90``, flips are slicing) and the
one property segmentation depends on: labels are only ever resampled nearest-neighbour, so a transformed
label map holds no value that was not there before, and pixels from outside the image are invalid.
"""

import grain
import ml_collections
import numpy as np
import pytest

from medjax.data import pipeline
from medjax.data import seg_transforms as S
from medjax.errors import ConfigError
from tests.conftest import data_config

LABELS = (0, 1, 3)


def element(h=24, w=20, seed=0):
    """Blocky label map with labels 0/1/3; the image encodes the label (value = 60 * label) plus noise 0."""
    rng = np.random.default_rng(seed)
    label = np.repeat(np.repeat(rng.choice(LABELS, (h // 4, w // 4)), 4, 0), 4, 1).astype(np.uint8)
    image = (label * 60)[..., None].astype(np.uint8)
    return {"image": image, "label": label, "valid": np.ones((h, w), np.uint8)}


def test_rotation_by_90_degrees_is_rot90_for_image_label_and_valid():
    e = element(20, 20)
    out = S.rotate_scale(e, 90.0, 1.0)
    for key in ("label", "valid"):
        np.testing.assert_array_equal(out[key], np.rot90(e[key], -1))
    # Bilinear at cos(90 deg) ~ 6e-17 may round a value down by one.
    np.testing.assert_allclose(out["image"], np.rot90(e["image"], -1), atol=1)


@pytest.mark.parametrize("seed", range(4))
def test_rotate_scale_and_elastic_keep_only_existing_labels_and_stay_aligned(seed):
    from scipy import ndimage

    e = element(seed=seed)
    rng = np.random.default_rng(seed)
    for out in (
        S.RandomRotateScale(40.0, (0.7, 1.4)).random_map(e, rng),
        S.RandomElastic(alpha=4.0, sigma=3.0, p=1.0).random_map(e, rng),
    ):
        assert set(np.unique(out["label"])) <= set(LABELS)
        assert out["image"].shape == e["image"].shape and out["label"].dtype == np.uint8
        # Away from label edges the bilinear image still reads 60 * label: image and label moved together.
        flat = ndimage.minimum_filter(out["label"], 3) == ndimage.maximum_filter(out["label"], 3)
        interior = flat & (ndimage.minimum_filter(out["valid"], 3, mode="constant") == 1)
        diff = np.abs(out["image"][..., 0].astype(int) - 60 * out["label"].astype(int))
        # Fixed-point rounding in Pillow leaves a few grey levels; a shift of one pixel would show as 60.
        assert interior.sum() > 50 and diff[interior].max() <= 3
    zoomed_out = S.rotate_scale(e, 0.0, 0.5)
    assert not zoomed_out["valid"][0].any() and zoomed_out["valid"][12, 10] == 1  # Border came from outside.
    assert not zoomed_out["label"][~zoomed_out["valid"].astype(bool)].any()


def test_flips_move_every_plane():
    e = element()
    out = S.RandomFlip(p_horizontal=1.0, p_vertical=1.0).random_map(e, np.random.default_rng(0))
    for key in ("image", "label", "valid"):
        np.testing.assert_array_equal(out[key], e[key][::-1, ::-1])
    assert S.RandomFlip(0.0, 0.0).random_map(e, np.random.default_rng(0)) is e


def test_patches_find_foreground_and_pad_small_images_as_invalid():
    label = np.zeros((40, 50), np.uint8)
    label[37, 2] = 2  # One labelled pixel in a corner.
    e = {"image": np.zeros((40, 50, 3), np.uint8), "label": label, "valid": np.ones((40, 50), np.uint8)}
    biased = S.RandomPatch((8, 8), foreground_prob=1.0)
    for seed in range(10):
        patch = biased.random_map(e, np.random.default_rng(seed))
        assert patch["label"].shape == (8, 8) and patch["image"].shape == (8, 8, 3)
        assert patch["label"].sum() == 2
    uniform = [S.RandomPatch((8, 8)).random_map(e, np.random.default_rng(s))["label"].sum() for s in range(9)]
    assert sum(uniform) < 2 * 9  # Unbiased patches mostly miss it.
    big = S.RandomPatch((48, 56)).random_map(e, np.random.default_rng(0))
    assert big["valid"].sum() == 40 * 50 and not big["valid"][40:].any() and not big["valid"][:, 50:].any()
    padded = S.PadToMultiple((584, 565), 32).map({**e, "label": np.zeros((584, 565), np.uint8),
        "image": np.zeros((584, 565, 3), np.uint8), "valid": np.ones((584, 565), np.uint8)})  # fmt: skip
    assert padded["label"].shape == (608, 576) and padded["valid"].sum() == 584 * 565


def _config(data_dir, **overrides) -> ml_collections.ConfigDict:
    cfg = data_config(
        **{
            "name": "synthetic_ct",
            "data_dir": str(data_dir),
            "manual_dir": None,
            "builder_kwargs": {
                "task": "segmentation", "image_size": 32, "num_train": 16, "num_validation": 8, "num_test": 8,
            },
            "image_size": 32,
            "patch_size": 24,
            "foreground_prob": 1.0,
            "pad_multiple": 12,
            "channels": 3,
            "batch_size": 8,
            "eval_batch_size": 5,
            "num_workers": 0,
            "augment": {
                "hflip": True, "vflip": False, "rotation_degrees": 15.0, "random_resized_crop_scale": None,
                "scale": (0.9, 1.1), "elastic_alpha": 2.0, "elastic_sigma": 4.0, "brightness": 0.1,
                "contrast": 0.1,
            },
            "normalize": {"mean": 0.5, "std": 0.25},
        }
    )  # fmt: skip
    cfg.update(overrides)
    return cfg


def test_segmentation_batches_metadata_patches_and_padded_eval(tfds_data_dir):
    cfg = _config(tfds_data_dir)
    meta = pipeline.dataset_metadata(cfg)
    assert meta.task == "segmentation" and meta.class_names == ("background", "lesion")
    assert meta.num_classes == 2
    assert meta.num_examples == {"train": 16, "validation": 8, "test": 8}
    assert sum(meta.label_counts["train"]) == 16 * 32 * 32 and meta.label_counts["train"][1] > 0

    iterator = iter(pipeline.make_train_loader(cfg, seed=0))
    epoch = [next(iterator) for _ in range(2)]  # 16 examples, batch 8.
    for batch in epoch:
        assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (8, 24, 24) and batch["label"].dtype == np.int32
        assert batch["valid"].shape == (8, 24, 24) and batch["valid"].dtype == bool
        assert set(np.unique(batch["label"])) <= {0, 1}
    # Foreground-centred patches: each of the 8 lesion slices shows its lesion, the 8 normal ones none.
    assert sum(int(b["label"][i].any()) for b in epoch for i in range(8)) == 8
    cached = next(iter(pipeline.make_train_loader(_config(tfds_data_dir, cache_decoded=True), seed=0)))
    for key in ("image", "label", "valid"):
        np.testing.assert_array_equal(cached[key], epoch[0][key])  # Caching changes nothing but speed.

    info = pipeline.example_info(cfg, "test")
    assert list(info["id"][:2]) == [b"test_000000", b"test_000001"] and (info["slice_index"] == -1).all()
    assert info["spacing"].shape == (8, 3) and "image" not in info and "mask" not in info
    source, _ = pipeline.load_source(cfg, "test")
    batches = list(pipeline.iterate_eval(cfg, split="test"))
    assert len(batches) == 2 and sum(int(b["mask"].sum()) for b in batches) == 8
    indices = np.concatenate([b["index"][b["mask"]] for b in batches])
    assert sorted(indices.tolist()) == list(range(8))
    for b in batches:
        assert b["label"].shape == (5, 36, 36) and b["image"].shape == (5, 36, 36, 3)  # 32 -> multiple of 12.
        assert not b["valid"][:, 32:].any() and b["valid"][:, :32, :32].all()
        for row, index in enumerate(b["index"]):
            np.testing.assert_array_equal(b["label"][row, :32, :32], source[int(index)]["mask"][..., 0])


def test_classification_augmentation_keys_are_refused_for_segmentation(tfds_data_dir):
    cfg = _config(tfds_data_dir)
    cfg.augment.random_resized_crop_scale = (0.5, 1.0)
    with pytest.raises(ConfigError, match="data.patch_size"):
        S.build_train_transforms(cfg)


def test_segmentation_transforms_depend_only_on_the_generator():
    steps = S.build_train_transforms(_config("/unused"))
    e = element(32, 32)

    def run(seed):
        rng, out = np.random.default_rng(seed), dict(e)
        for step in steps:
            out = step.random_map(out, rng) if isinstance(step, grain.transforms.RandomMap) else step.map(out)
        return out

    a, b = run(5), run(5)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert a["image"].shape == (24, 24, 3) and a["label"].shape == (24, 24)
