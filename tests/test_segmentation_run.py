"""Segmentation end to end on tiny synthetic data at 32 px: train, resume, evaluate, predict (PNG and NIfTI),
and the configs' segmentation variants."""

import csv

import flax.linen as nn
import jax
import ml_collections
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medjax import config_lib, predict, run_dir, seg_predict, sliding_window, train
from medjax.errors import ConfigError
from medjax.evaluate import command
from tests.conftest import ROOT, smoke_config

SPEC = f"{ROOT}/configs/drive.py:smoke"


def test_segmentation_trains_resumes_evaluates_and_predicts(tmp_path, tfds_data_dir):
    config = smoke_config(tfds_data_dir, SPEC, num_epochs=2 / 8, eval_every_epochs=2 / 8)
    workdir = tmp_path / "run"
    report = train.train_and_evaluate(config, workdir)
    assert report["steps"] == 2 and report["model"] == "unet"
    assert set(report["test"]) >= {"mean_dice", "dice_lesion", "pixel_dice_lesion", "pixel_auc", "loss"}
    again = train.train_and_evaluate(config, workdir)  # Resumes at the final step: nothing to train.
    assert again["steps"] == 2 and again["test"]["mean_dice"] == report["test"]["mean_dice"]

    evaluated = command.evaluate_run(workdir, bootstrap_samples=20, latency_runs=1)
    test = evaluated["splits"]["test"]
    assert test["unit"] == "image" and test["num_examples"] == 24
    assert test["metrics"]["mean_dice"]["value"] == pytest.approx(report["test"]["mean_dice"])
    assert (workdir / "evaluation" / "per_case_test.csv").exists()

    model = run_dir.load_run(workdir)
    image = (np.random.default_rng(0).random((37, 41)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    affine = np.array([[0.7, 0, 0, 5], [0, 0.8, 0, -3], [0, 0, 2.5, 1], [0, 0, 0, 1]])
    nib.Nifti1Image(np.random.default_rng(1).normal(size=(30, 28, 3)).astype(np.float32), affine).to_filename(
        tmp_path / "v.nii.gz"
    )
    files = predict.find_images([tmp_path / "a.png", tmp_path / "v.nii.gz", tmp_path / "missing.png"])
    rows = seg_predict.predict_files(model, files, out_dir=tmp_path / "masks", with_probs=True)
    assert [bool(r["error"]) for r in rows] == [False, False, True]
    mask = np.asarray(Image.open(rows[0]["mask"]))
    assert mask.shape == (37, 41) and set(np.unique(mask)) <= {0, 1}
    assert np.asarray(Image.open(rows[0]["probabilities"])).shape == (37, 41)
    volume = nib.load(rows[1]["mask"])
    assert volume.shape == (30, 28, 3) and volume.get_data_dtype() == np.uint8
    np.testing.assert_allclose(volume.affine, affine)
    assert nib.load(rows[1]["probabilities"]).shape == (30, 28, 3)
    predict.write_csv(rows, tmp_path / "rows.csv")
    assert next(csv.reader((tmp_path / "rows.csv").open()))[:2] == ["path", "mask"]


def test_a_task_the_dataset_does_not_have_is_refused(tmp_path, tfds_data_dir):
    config = smoke_config(tfds_data_dir, f"{ROOT}/configs/chest_xray.py:smoke")
    config.task = "segmentation"
    with pytest.raises(ConfigError, match="classification dataset"):
        train.train_and_evaluate(config, tmp_path / "run")


@pytest.mark.parametrize("name", ["drive", "synapse", "acdc", "seg_folder"])
def test_segmentation_configs_pick_either_model(name):
    for model, model_name in (("unet", "unet"), ("mednext", "mednext_plos_seg")):
        for variant in ("real", "smoke"):
            config = config_lib.load_config_file(f"{ROOT}/configs/{name}.py:variant={variant},model={model}")
            assert config.task == "segmentation" and config.model_name == model_name
            assert set(config.loss) == {"cross_entropy", "dice"} and config.data.pad_multiple == 32
    with pytest.raises(ValueError, match="unet, mednext"):
        config_lib.load_config_file(f"{ROOT}/configs/{name}.py:model=resnet")


def test_segmentation_keys_are_in_the_base_config():
    config = config_lib.base_config(task="segmentation")
    flat = config_lib.flatten(config)
    for key in ("data.patch_size", "data.foreground_prob", "data.cache_decoded", "data.augment.elastic_alpha",
                "eval.window", "eval.overlays"):  # fmt: skip
        assert key in flat
    assert "data.patch_size" not in config_lib.flatten(config_lib.base_config())
    assert isinstance(config.data.augment, ml_collections.ConfigDict)


def test_sliding_window_model_blends_inside_the_jitted_step():

    class Pointwise(nn.Module):  # Translation-equivariant without borders: windows change nothing.
        @nn.compact
        def __call__(self, x, *, train):
            return nn.Conv(3, (1, 1))(x), {"features": x.mean((1, 2))}

    model = Pointwise()
    images = jax.random.normal(jax.random.key(0), (2, 13, 9, 2))
    variables = model.init(jax.random.key(1), images, train=False)
    windowed = sliding_window.SlidingWindow(model, (6, 4), 0.5)
    logits, aux = windowed.apply(variables, images, train=False)
    np.testing.assert_allclose(logits, model.apply(variables, images, train=False)[0], rtol=1e-5, atol=1e-5)
    assert aux == {} and windowed.apply(variables, images, train=True)[1]  # Training is never windowed.
    config = config_lib.base_config(task="segmentation")
    assert sliding_window.wrap(model, config) is model
    config.eval.window = 64
    assert sliding_window.wrap(model, config).window == (64, 64)
