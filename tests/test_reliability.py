"""Faults a user or a hostile archive brings, without training: bad configs stop at load time naming the
key, every command fails with one ``medjax: error:`` paragraph, datasets survive symlink loops, links out
of the archive, non-UTF-8 names, NaN pixels, concurrent and interrupted preparations, and predictions
never leave the program non-finite."""

import json
import math
import os
import subprocess
import sys
import threading
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from medjax import cli, config_checks, config_lib, locking, metrics, tasks
from medjax.data import builders, images
from medjax.errors import BusyError, ConfigError, NonFiniteOutputError
from medjax.finite import check_outputs

from .conftest import ROOT, SMOKE

RNG = np.random.default_rng(0)


def _smoke(**overrides) -> ml_collections.ConfigDict:
    config = config_lib.load_config_file(SMOKE)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("data.batch_size", 0, "data.batch_size=0: must be >= 1"),
        ("data.image_size", 0, "data.image_size=0: must be >= 1"),
        ("data.channels", 2, "data.channels=2: must be one of 1, 3"),
        ("train.num_epochs", 0.0, "train.num_epochs=0.0: must be > 0"),
        ("train.num_epochs", -1.0, "train.num_epochs=-1.0: must be > 0"),
        ("train.keep_checkpoints", 0, "train.keep_checkpoints=0: must be >= 1"),
        ("train.select_best_on", "acc", "train.select_best_on='acc': must be one of 'loss', 'accuracy'"),
        ("train.early_stopping.monitor", "aucc", "train.early_stopping.monitor='aucc': must be one of"),
        ("optim.name", "adamx", "optim.name='adamx': must be one of 'adam', 'adamw', 'sgd'"),
        ("train.ema_decay", 1.0, r"train.ema_decay=1.0: must be in \[0, 1\)"),
        ("data.builder_kwargs.num_train", 0, r"data.builder_kwargs \(synthetic_ct\): num_train must be"),
    ],
)
def test_every_bad_value_is_refused_at_load_time_naming_its_key(key, value, message):
    config = _smoke()
    config.unlock()
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(config)


def test_validation_metrics_are_what_evaluation_reports():
    labels, probs = np.array([0, 1, 1, 0]), np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1]])
    reported = metrics.classification_metrics(labels=labels, probs=probs, class_names=("a", "b"))
    scalars = {k for k, v in reported.items() if isinstance(v, float)} | {"loss"}
    assert set(tasks.get_task("classification").VALIDATION_METRICS) == scalars


def test_segmentation_metrics_selectable_are_what_validation_reports():
    seg = tasks.get_task("segmentation")
    label = np.array([[[0, 1], [1, 1]], [[0, 0], [1, 0]]], np.uint8)
    predictions = {
        "label": label,
        "prediction": np.array([[[0, 1], [0, 1]], [[0, 1], [1, 0]]], np.uint8),
        "valid": np.ones_like(label, bool),
        "score": np.array([[[0.1, 0.9], [0.4, 0.8]], [[0.2, 0.6], [0.7, 0.3]]]),
    }
    reported = seg.validation_metrics(predictions, ("background", "lesion"))
    config = _smoke(task="segmentation")
    for name in [*reported, "loss"]:  # Every name validation reports can be selected on ...
        config.train.select_best_on = name
        config_checks.check_values(config)
    for name in ("mean_hd95", "dice_", "auc"):  # ... and nothing it does not report.
        config.train.select_best_on = name
        with pytest.raises(
            ConfigError,
            match=rf"train.select_best_on='{name}': must be one of 'loss'.*"
            r"dice_<class name>",
        ):
            config_checks.check_values(config)


def test_builder_kwargs_are_completed_so_dotted_overrides_reach_them(tmp_path):
    config = config_lib.load_config_file(f"{ROOT}/configs/chest_xray.py")
    assert config.data.builder_kwargs.skip_corrupt is False  # Completed from the builder's defaults.
    assert config.data.builder_kwargs.validation_fraction == 0.2  # The config's own value is kept.
    # An old config.json without the added keys still matches (they sit at the builder's defaults).
    saved = json.loads(config_lib.to_json(config))
    del saved["data"]["builder_kwargs"]["skip_corrupt"], saved["data"]["builder_kwargs"]["dicom_window"]
    assert config_lib.differing_keys(saved, config.to_dict()) == []
    # From the command line: the dotted override is accepted, and the next bad value is what stops it.
    result = _launch_cli(
        tmp_path,
        f"--config={ROOT}/configs/chest_xray.py",
        "--config.data.builder_kwargs.skip_corrupt=True",
        "--config.data.batch_size=0",
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "medjax: error: Invalid config values:\n  data.batch_size=0: must be >= 1"


def _launch_cli(tmp_path, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "medjax.launch", f"--workdir={tmp_path / 'run'}", *args],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_user_errors_print_one_paragraph_and_the_traceback_only_when_asked(capsys, monkeypatch):
    def failing(argv):
        raise ConfigError("train.keep_checkpoints=0: must be >= 1\n\n  (more)")

    with pytest.raises(SystemExit) as info:
        cli.guard(failing)([])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err == "medjax: error: train.keep_checkpoints=0: must be >= 1\n  (more)\n"
    monkeypatch.setenv(cli.VERBOSE_ENV, "1")
    with pytest.raises(SystemExit):
        cli.guard(failing)([])
    assert "Traceback" in capsys.readouterr().err
    full = OSError(28, "No space left on device", "/full/metrics.jsonl")
    assert cli.is_user_error(full)
    assert cli.error_paragraph(full) == "medjax: error: No space left on device: /full/metrics.jsonl"
    assert not cli.is_user_error(KeyError("bug"))  # Bugs keep their traceback.


def test_non_finite_probabilities_never_leave_the_program():
    check_outputs(np.array([[0.25, 0.75]]), what="test")
    with pytest.raises(NonFiniteOutputError, match="2 of 3 examples"):
        check_outputs(np.array([[math.nan, math.nan], [0.5, 0.5], [math.inf, 0.0]]), what="run x")


def test_nan_pixels_of_a_float_tiff_are_black_and_the_rest_keeps_its_range(tmp_path):
    values = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    values[0, 0] = np.nan
    Image.fromarray(values, "F").save(tmp_path / "nan.tif")
    decoded = images.decode_image(tmp_path / "nan.tif", channels=1)[..., 0]
    assert decoded[0, 0] == 0 and decoded[3, 3] == 255
    expected = np.round((values - values[0, 1]) * 255 / (1.0 - values[0, 1]))
    np.testing.assert_array_equal(decoded.ravel()[1:], expected.ravel()[1:])
    Image.fromarray(np.full((4, 4), np.nan, np.float32), "F").save(tmp_path / "all_nan.tif")
    with pytest.raises(images.ImageDecodeError, match="all_nan.tif: no finite pixel"):
        images.decode_image(tmp_path / "all_nan.tif", channels=1)


def _noise_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def hostile_archive(tmp_path):
    """Two classes of 6 images, plus: a ``loop -> .`` link at the root, a link inside a class to its own
    folder, a link leaving the archive, a non-UTF-8 file name, a corrupt file and one image in both
    classes (conflicting labels)."""
    root = tmp_path / "manual"
    for k, name in enumerate(("cat", "dog")):
        for i in range(6):
            _noise_png(root / name / f"{i}.png", seed=10 * k + i)
    outside = tmp_path / "outside"
    _noise_png(outside / "secret.png", seed=99)
    (root / "loop").symlink_to(".")
    (root / "cat" / "again").symlink_to("../cat")
    (root / "dog" / "escape.png").symlink_to(outside / "secret.png")
    _noise_png(root / "dog" / os.fsdecode(b"caf\xe9.png"), seed=7)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "dog" / "shared.png").write_bytes((root / "cat" / "0.png").read_bytes())
    return root


def test_hostile_archive_prepares_skipping_and_listing_what_it_must(hostile_archive, tmp_path, capsys):
    builder = builders.get_builder(
        "image_folder",
        data_dir=str(tmp_path / "data"),
        manual_dir=str(hostile_archive),
        builder_kwargs={"image_size": 16, "skip_corrupt": True, "split_fractions": (0.5, 0.25, 0.25)},
    )
    builders.prepare(builder)
    assert builder.info.features["label"].names == ["cat", "dog"]  # No class "loop".
    report = builder.info.metadata["preparation"]
    assert {(e["path"], e["reason"].split(" (")[0]) for e in report["skipped_links"]} == {
        ("loop", "link to a folder that contains it"),
        ("cat/again", "link to a folder that contains it"),
        ("dog/escape.png", "link leaves manual_dir"),
    }
    assert [e["id"] for e in report["skipped_corrupt"]] == ["cat/broken.png"]
    assert report["label_conflict_groups"] == 1 and report["label_conflict_items"] == 2
    ids = {
        example["id"].decode()
        for split in builder.info.splits
        for example in builder.as_data_source(split=split)
    }
    assert len(ids) == 14 and "dog/caf\\xe9.png" in ids  # 6 + 6 + the non-UTF-8 one + shared.
    summary = capsys.readouterr().out
    assert "Skipped 1 unreadable file(s) (first: cat/broken.png)" in summary
    assert "Skipped 3 symbolic link(s)" in summary
    assert "2 images in 1 groups of identical pixels carry conflicting labels" in summary


def test_one_preparation_at_a_time_and_leftovers_are_removed(hostile_archive, tmp_path, capsys):
    def builder(size):
        return builders.get_builder(
            "image_folder",
            data_dir=str(tmp_path / "data"),
            manual_dir=str(hostile_archive),
            builder_kwargs={"image_size": size, "skip_corrupt": True},
        )

    # An interrupted preparation's leftover is removed by the next one.
    first = builder(16)
    target = first.data_path
    leftover = target.parent / f"{builders.INCOMPLETE_PREFIX}ABC123_{target.name}"
    leftover.mkdir(parents=True)
    builders.prepare(first)
    assert first.is_prepared() and not leftover.exists()

    # While another holder prepares (this thread stands in: flock locks per open file), a second
    # preparation waits, names the holder, then uses the finished dataset instead of racing it.
    preparing, waiting = builder(12), builder(12)
    lock = preparing.data_path.parent / f".{preparing.data_path.name}.lock"
    with locking.exclusive(lock, what="test"):
        waiter = threading.Thread(target=builders.prepare, args=(waiting,))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()
        preparing.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=str(hostile_archive)),
        )
    waiter.join(timeout=60)
    assert f"Waiting for pid {os.getpid()}" in capsys.readouterr().out
    assert sum(split.num_examples for split in waiting.info.splits.values()) == 14


def test_a_held_workdir_is_refused_naming_its_holder_and_freed_when_it_is_killed(tmp_path):
    lock = tmp_path / "workdir.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from medjax import locking\n"
            f"with locking.exclusive({str(lock)!r}, what='w'):\n print('held', flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    busy = pytest.raises(BusyError, match=rf"workdir x is in use by pid {holder.pid} on host")
    with busy, locking.exclusive(lock, what="workdir x"):
        pass
    holder.kill()  # SIGKILL: the kernel releases the lock; no stale lock to clean up.
    holder.wait()
    with locking.exclusive(lock, what="workdir x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
