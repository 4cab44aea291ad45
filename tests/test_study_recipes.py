"""What each study config must keep from ../shared/docs/PAPERS.md, and how the best checkpoint is chosen.

A study's stated recipe is pinned here so that changing it is a deliberate edit of this file too; what the
studies leave open (learning rates, widths, the ``cpu`` variants) is not pinned.
"""

import jax
import numpy as np
import pytest

from medjax import config_lib
from medjax.checkpointing import RunCheckpointer
from medjax.data.builders import chest_xray
from tests.conftest import ROOT


def _config(spec: str):
    return config_lib.load_config_file(str(ROOT / "configs" / spec))


def test_study_a_brain_mri_recipe():
    """ConvNeXt-Tiny, GAP+GMP concatenated, SEVector (ratio 16), feature smoothing (lambda 0.1) with
    cross-entropy; 224x224, AdamW, cosine with warm-up, batch 32, 10 epochs; a 4-class brain MRI set."""
    c = _config("brain_mri.py")
    assert (c.model_name, c.model.variant) == ("convnext", "tiny")
    assert (c.model.pooling, c.model.fusion, c.model.sevector_ratio) == ("avg+max", "concat", 16)
    assert set(c.loss) == {"cross_entropy", "feature_smoothing"}
    assert c.loss.feature_smoothing.weight == 0.1
    assert (c.data.name, c.data.builder_kwargs.variant) == ("brain_mri", "four_class")
    assert c.data.image_size == c.data.builder_kwargs.image_size == 224
    assert (c.optim.name, c.optim.schedule, c.data.batch_size, c.train.num_epochs) == (
        "adamw",
        "cosine",
        32,
        10,
    )
    assert c.optim.warmup_epochs > 0


def test_study_b_covid_ct_recipe():
    """medjax's 2-D MedNeXt of study B (tiny: widths 48-384, depths 2-2-6-2) on SARS-CoV-2 CT-scan, the
    config's ``model=mednext_plos`` arm (its default is study C's ImageNet recipe for CT)."""
    c = _config("covid_ct.py:model=mednext_plos")
    assert (c.model_name, c.model.variant, c.data.name) == ("mednext_plos", "tiny", "sars_cov2_ct")


def test_study_c_chest_xray_recipe():
    """224x224 scaled to [0, 1], rotations and horizontal flips, MobileNetV2, 80/20 train/validation,
    Adam, cosine annealing, early stopping on validation loss; Kermany chest X-ray, by patient."""
    c = _config("chest_xray.py")
    assert (c.model_name, c.data.name) == ("mobilenet_v2", "chest_xray")
    assert c.data.image_size == c.data.builder_kwargs.image_size == 224
    assert (c.data.normalize.mean, c.data.normalize.std) == (0.0, 1.0)
    assert c.data.augment.hflip and c.data.augment.rotation_degrees > 0
    assert c.data.builder_kwargs.validation_fraction == 0.2
    patients = chest_xray.PATIENT_PATTERN
    assert c.data.builder_kwargs.get("group_pattern", patients) == patients  # Validation by patient.
    assert (c.optim.name, c.optim.schedule) == ("adam", "cosine")
    assert c.train.early_stopping.monitor == "loss" and c.train.early_stopping.patience > 0
    assert c.train.select_best_on == "loss"


@pytest.mark.parametrize(("metric", "mode", "values", "best"), [
    ("loss", "min", [0.9, 0.5, 0.7, 0.4, 0.6, 0.45], 4),
    ("auc", "max", [0.6, 0.8, 0.7, 0.9, 0.85, 0.5], 4),
])  # fmt: skip
def test_best_checkpoint_is_the_best_evaluation_when_validation_is_not_monotonic(
    tmp_path, metric, mode, values, best
):
    """Six evaluations whose metric goes up and down: the kept checkpoint is the best one (not the last,
    not the first improvement), and what it restores are that evaluation's weights."""
    ckpt = RunCheckpointer(tmp_path / "checkpoints", keep=2, best_metric=metric, best_mode=mode)
    try:
        for k, value in enumerate(values, start=1):
            variables = {"params": {"w": np.full((3,), float(k), np.float32)}}
            ckpt.save_best(10 * k, variables=variables, metrics={metric: value, "accuracy": 0.5})
        assert ckpt.best_step() == 10 * best
        abstract = {"params": {"w": jax.ShapeDtypeStruct((3,), np.float32)}}
        restored = ckpt.restore_best(abstract_variables=abstract)
        np.testing.assert_array_equal(restored["params"]["w"], np.full((3,), float(best), np.float32))
    finally:
        ckpt.close()
    assert [p.name for p in (tmp_path / "checkpoints" / "best").iterdir() if p.name.isdigit()] == [
        str(10 * best)
    ]
