"""Grain input pipelines (train: shuffle/augment/checkpoint; eval: padding + mask) and the transforms."""

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from medjax.data import pipeline
from medjax.data import transforms as T


def _config(data_dir, **overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        {
            "name": "synthetic_ct",
            "data_dir": str(data_dir),
            "manual_dir": None,
            "builder_kwargs": {"image_size": 32, "num_train": 40, "num_validation": 20, "num_test": 20},
            "image_size": 32,
            "channels": 3,
            "batch_size": 8,
            "eval_batch_size": 16,
            "num_workers": 0,
            "interpolation": "bilinear",
            "read_threads": 2,
            "prefetch_batches": 4,
            "augment": {
                "hflip": True,
                "vflip": False,
                "rotation_degrees": 10.0,
                "random_resized_crop_scale": (0.7, 1.0),
                "brightness": 0.1,
                "contrast": 0.1,
            },
            "normalize": {"mean": 0.5, "std": 0.25},
        }
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def cfg(tfds_data_dir):
    return _config(tfds_data_dir)


def _take(loader, n, state=None):
    iterator = iter(loader)
    if state is not None:
        iterator.set_state(state)
    return [next(iterator) for _ in range(n)], iterator


def _assert_batches_equal(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_metadata(cfg):
    meta = pipeline.dataset_metadata(cfg)
    assert meta.class_names == ("normal", "lesion") and meta.num_classes == 2
    assert meta.num_examples == {"train": 40, "validation": 20, "test": 20}
    assert meta.label_counts == {"train": (20, 20), "validation": (10, 10), "test": (10, 10)}


def test_train_batches_are_static_epochs_complete_and_reshuffled(cfg):
    batches, _ = _take(pipeline.make_train_loader(cfg, seed=0), 10)  # 40 / 8 = 5 batches per epoch.
    for batch in batches:
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # Grey -> 3 channels.
    for epoch in (batches[:5], batches[5:]):
        assert sum(int(b["label"].sum()) for b in epoch) == 20  # Each epoch holds every example once.
    order = [np.concatenate([b["label"] for b in epoch]) for epoch in (batches[:5], batches[5:])]
    assert not np.array_equal(order[0], order[1])


def test_train_is_seeded(cfg):
    first, _ = _take(pipeline.make_train_loader(cfg, seed=3), 2)
    again, _ = _take(pipeline.make_train_loader(cfg, seed=3), 2)
    other, _ = _take(pipeline.make_train_loader(cfg, seed=4), 2)
    _assert_batches_equal(first, again)
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_train_iterator_state_resumes_exactly(cfg, tmp_path):
    loader = pipeline.make_train_loader(cfg, seed=0)
    _, iterator = _take(loader, 3)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(4)]  # Batches 4..7, crossing the epoch boundary.
    resumed, _ = _take(pipeline.make_train_loader(cfg, seed=0), 4, state=state)
    _assert_batches_equal(expected, resumed)

    # The same through Orbax, as the trainer saves it beside the model state.
    _, iterator = _take(loader, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        fresh = iter(pipeline.make_train_loader(cfg, seed=0))
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_batches_equal(expected, [next(fresh) for _ in range(4)])


def test_worker_processes_give_identical_batches(cfg):
    in_process, _ = _take(pipeline.make_train_loader(cfg, seed=0), 3)
    workers, iterator = _take(pipeline.make_train_loader(_config(cfg.data_dir, num_workers=2), seed=0), 3)
    iterator.close()
    _assert_batches_equal(in_process, workers)


def _plain(data_dir) -> ml_collections.ConfigDict:
    """Config without augmentation (and batch 4), so images can be compared."""
    plain = _config(data_dir, batch_size=4)
    plain.augment.update(
        hflip=False, rotation_degrees=0.0, random_resized_crop_scale=None, brightness=0.0, contrast=0.0
    )
    return plain


def _concat_rows(shards):
    """The global batches from per-process lists of batches (rows in process order)."""
    return [
        {k: np.concatenate([batch[k] for batch in step]) for k in step[0]}
        for step in zip(*shards, strict=True)
    ]


def test_process_shards_are_the_rows_of_the_same_global_batches(cfg):
    whole, _ = _take(pipeline.make_train_loader(cfg, seed=0), 6)  # Augmented, across an epoch boundary.
    shards = [
        _take(pipeline.make_train_loader(cfg, seed=0, shard_index=i, shard_count=2), 6)[0] for i in (0, 1)
    ]
    assert shards[0][0]["image"].shape == (4, 32, 32, 3)  # batch_size is global: 8 rows over 2 processes.
    _assert_batches_equal(whole, _concat_rows(shards))
    with pytest.raises(
        ValueError, match=r"data.batch_size=8 must be divisible by the number of processes \(3\)"
    ):
        pipeline.make_train_loader(cfg, seed=0, shard_index=0, shard_count=3)


def test_start_batch_resumes_at_a_step_for_any_process_count(cfg):
    whole, _ = _take(pipeline.make_train_loader(cfg, seed=0), 7)
    resumed, _ = _take(pipeline.make_train_loader(cfg, seed=0, start_batch=4), 3)
    _assert_batches_equal(whole[4:], resumed)
    shards = [
        _take(pipeline.make_train_loader(cfg, seed=0, shard_index=i, shard_count=2, start_batch=4), 3)[0]
        for i in (0, 1)
    ]
    _assert_batches_equal(whole[4:], _concat_rows(shards))


def test_eval_shards_hold_every_example_once(cfg):
    whole = list(pipeline.iterate_eval(cfg, split="validation", batch_size=8))  # 20 -> 3 batches, 4 padded.
    shards = [
        list(pipeline.iterate_eval(cfg, split="validation", batch_size=8, shard_index=i, shard_count=2))
        for i in (0, 1)
    ]
    assert [len(s) for s in shards] == [3, 3]  # Every process runs the same number of eval steps.
    merged = _concat_rows(shards)
    for a, b in zip(whole, merged, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    index = np.concatenate([b["index"] for b in merged])
    mask = np.concatenate([b["mask"] for b in merged])
    np.testing.assert_array_equal(np.sort(index[mask]), np.arange(20))


def test_eval_counts_every_example_once_with_static_batches(cfg):
    source, _ = pipeline.load_source(cfg, "validation")
    batches = list(pipeline.iterate_eval(cfg, split="validation"))
    assert [b["image"].shape for b in batches] == [(16, 32, 32, 3)] * 2
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.sum() == 20 and not mask[20:].any()
    np.testing.assert_array_equal(np.sort(index[mask]), np.arange(20))
    np.testing.assert_array_equal(labels[mask], [source[i]["label"] for i in index[mask]])
    # No augmentation: pixels are exactly (x / 255 - mean) / std of the stored image.
    expected = (source[5]["image"].astype(np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(batches[0]["image"][5], np.repeat(expected, 3, -1), rtol=1e-6)


def test_eval_batch_larger_than_split(cfg):
    batches = list(pipeline.iterate_eval(cfg, split="test", batch_size=64))
    assert len(batches) == 1 and batches[0]["mask"].sum() == 20 and batches[0]["label"].shape == (64,)


# --- transforms -------------------------------------------------------------------------------------


def _element(h=6, w=5, c=1, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(h, w, c)).astype(dtype)
    return {"image": image if dtype == np.uint8 else image / np.float32(255), "label": 1}


def test_resize_nearest_doubling_repeats_pixels_for_uint8_and_float():
    for dtype in (np.uint8, np.float32):
        element = _element(4, 4, 1, dtype)
        out = T.Resize(8, "nearest").map(element)["image"]
        expected = element["image"].repeat(2, axis=0).repeat(2, axis=1)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, expected)
    rgb = T.Resize(10).map(_element(6, 8, 3))["image"]
    assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8


def test_to_channels_matches_pillow_luma_and_replicates_grey():
    rgb = _element(7, 9, 3)
    grey = T.ToChannels(1).map(rgb)["image"]
    pillow = np.asarray(Image.fromarray(rgb["image"]).convert("L"))
    assert np.abs(grey[..., 0].astype(int) - pillow).max() <= 1  # Pillow uses fixed-point weights.
    np.testing.assert_array_equal(T.ToChannels(3).map({"image": grey})["image"], np.repeat(grey, 3, -1))
    with pytest.raises(ValueError, match="4 channels"):
        T.ToChannels(3).map(_element(2, 2, 4))


def test_scale_and_normalize_per_channel():
    image = np.array([[[0, 255, 51]]], np.uint8)
    out = T.ScaleAndNormalize(mean=(0.0, 0.5, 0.2), std=(1.0, 0.5, 0.1)).map({"image": image})["image"]
    np.testing.assert_allclose(out, [[[0.0, 1.0, 0.0]]], atol=1e-6)
    assert out.dtype == np.float32


def test_flips_are_exact_and_probability_switches_them():
    element, rng = _element(), np.random.default_rng(0)
    np.testing.assert_array_equal(
        T.RandomHorizontalFlip(p=1.0).random_map(element, rng)["image"], element["image"][:, ::-1]
    )
    np.testing.assert_array_equal(
        T.RandomVerticalFlip(p=1.0).random_map(element, rng)["image"], element["image"][::-1]
    )
    assert T.RandomHorizontalFlip(p=0.0).random_map(element, rng) is element


def test_rotation_by_zero_is_identity_and_rotation_keeps_shape():
    element = _element(8, 8, 3)
    assert T.RandomRotation(0.0).random_map(element, np.random.default_rng(0)) is element
    rotated = T.RandomRotation(30.0).random_map(element, np.random.default_rng(0))["image"]
    assert (
        rotated.shape == (8, 8, 3)
        and rotated.dtype == np.uint8
        and not np.array_equal(rotated, element["image"])
    )


def test_random_resized_crop_full_scale_equals_resize():
    element = _element(40, 40, 1, np.float32)
    for seed in range(5):
        crop = T.RandomResizedCrop(24, scale=(1.0, 1.0)).random_map(element, np.random.default_rng(seed))
        np.testing.assert_array_equal(crop["image"], T.Resize(24).map(element)["image"])
    small = T.RandomResizedCrop(24, scale=(0.1, 0.2)).random_map(element, np.random.default_rng(0))["image"]
    assert small.shape == (24, 24, 1)


def test_brightness_contrast_identity_at_zero_and_clipped():
    element = _element(5, 5, 1)
    same = T.RandomBrightnessContrast(0.0, 0.0).random_map(element, np.random.default_rng(0))["image"]
    np.testing.assert_array_equal(same, element["image"])
    bright = T.RandomBrightnessContrast(0.5, 0.5).random_map(element, np.random.default_rng(0))["image"]
    assert bright.dtype == np.uint8 and not np.array_equal(bright, element["image"])


@pytest.mark.parametrize(
    "transform",
    [
        T.RandomHorizontalFlip(),
        T.RandomVerticalFlip(),
        T.RandomRotation(20.0),
        T.RandomResizedCrop(16, scale=(0.3, 1.0)),
        T.RandomBrightnessContrast(0.2, 0.2),
    ],
)
def test_random_transforms_depend_only_on_the_generator(transform):
    element = _element(20, 20, 3)
    outputs = [transform.random_map(element, np.random.default_rng(s))["image"] for s in (1, 1, 2, 3, 4, 5)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert any(not np.array_equal(outputs[0], o) for o in outputs[2:])


def test_transform_lists_follow_the_config(cfg):
    names = [type(t).__name__ for t in T.build_train_transforms(cfg)]
    assert names == [
        "RandomResizedCrop",
        "RandomRotation",
        "RandomHorizontalFlip",
        "RandomBrightnessContrast",
        "ToChannels",
        "ScaleAndNormalize",
    ]
    basic = ["Resize", "ToChannels", "ScaleAndNormalize"]
    assert [type(t).__name__ for t in T.build_train_transforms(_plain(cfg.data_dir))] == basic
    assert [type(t).__name__ for t in T.build_eval_transforms(cfg)] == basic
