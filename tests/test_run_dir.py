"""The run-directory contract (:mod:`medjax.run_dir`), the inference pass and the task registry."""

import json
import re
import shutil

import numpy as np
import pytest

from medjax import inference, run_dir, tasks, train
from medjax.errors import ConfigError, MedjaxError

from .conftest import ROOT

RUN_FILE_NAMES = ("config.json", "dataset.json", "report.json", "metrics.jsonl", "checkpoints", "tensorboard")


def test_run_file_names_are_spelt_only_in_run_dir():
    """Everyone else asks :class:`run_dir.RunDir`, so the layout can change in one place. (Dataset
    builders are not scanned: a downloaded archive's own files may share a name, e.g. MSD's dataset.json.)"""
    spelt = re.compile("|".join(rf"[\"']{re.escape(name)}[\"']" for name in RUN_FILE_NAMES))
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("medjax", "launch", "configs")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "run_dir.py" and "data" not in path.relative_to(ROOT).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if spelt.search(line)
    ]
    assert not offenders, offenders


def test_a_run_written_before_newer_config_keys_still_loads(smoke_run, tmp_path):
    old = tmp_path / "old_run"
    shutil.copytree(smoke_run, old)
    config = json.loads((old / "config.json").read_text())
    for key in ("task", "rng_impl"):
        config.pop(key)
    for key in ("interpolation", "read_threads", "prefetch_batches"):
        config["data"].pop(key)
    (old / "config.json").write_text(json.dumps(config))

    model = run_dir.load_run(old)
    assert model.config.task == "classification" and model.config.data.interpolation == "bilinear"
    assert model.config.loss.to_dict() == config["loss"]  # Free-form sections are taken as saved.
    fresh = run_dir.load_run(smoke_run)
    images = np.random.default_rng(0).normal(size=(3, *fresh.image_shape)).astype(np.float32)
    np.testing.assert_array_equal(model.predict_proba(images), fresh.predict_proba(images))


def test_not_a_run_directory_says_what_one_holds(tmp_path):
    with pytest.raises(MedjaxError, match="not a medjax run directory.*config.json, dataset.json"):
        run_dir.load_run(tmp_path)


def test_finished_report_refuses_another_configs_run(smoke_run, capsys):
    run = run_dir.RunDir(smoke_run)
    config = run.read_config()
    assert run.finished_report(config) == run.read_report()
    assert train.train_or_read_back(config, smoke_run, announce="== training") == run.read_report()
    assert "== training" not in capsys.readouterr().out  # Read back: nothing trained.
    config.optim.learning_rate *= 2
    with pytest.raises(ConfigError, match="another config.*optim.learning_rate"):
        run.finished_report(config)


def test_map_batches_pads_to_one_shape_and_drops_the_padding():
    shapes = []

    def fn(x, y):
        shapes.append(x.shape)
        return x * 2, (x + y).sum(axis=1)

    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    doubled, sums = inference.map_batches(fn, x, np.ones_like(x), batch_size=3)
    assert shapes == [(3, 2)] * 3  # 7 rows: the last chunk padded from 1 to 3.
    np.testing.assert_array_equal(doubled, x * 2)
    np.testing.assert_array_equal(sums, x.sum(axis=1) + 2)
    with pytest.raises(ValueError, match="at least one"):
        inference.map_batches(fn, x[:0], x[:0], batch_size=3)


def test_predict_split_counts_every_example_once_in_storage_order(smoke_run, tfds_data_dir):
    data_cfg = run_dir.load_run(smoke_run).config.data
    data_cfg.data_dir = str(tfds_data_dir)

    def fn(batch):  # Per-example outputs are cut to real rows; 0-d outputs are summed.
        return {"twice": np.asarray(batch["label"]) * 2, "rows": np.asarray(batch["mask"]).sum()}

    out = inference.predict_split(fn, data_cfg, split="test", batch_size=5)  # 24 examples: padded to 25.
    np.testing.assert_array_equal(out["index"], np.arange(24))
    np.testing.assert_array_equal(out["twice"], out["label"] * 2)
    assert out["rows"] == 24


def test_tasks_are_found_by_name():
    assert "classification" in tasks.available_tasks()
    assert tasks.get_task("classification").default_loss() == {
        "cross_entropy": {"weight": 1.0, "label_smoothing": 0.0}
    }
    with pytest.raises(ConfigError, match="Unknown task 'detection'.*classification"):
        tasks.get_task("detection")
