"""launch/pretrained_starts.py: the configs it trains and the table it writes (its runs are measured, not
tested: see results/)."""

import sys

import pytest

from medjax import recipes
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "launch"))  # The launch scripts import their siblings.
import pretrained_starts as ps


def test_small_subsets_get_enough_epochs_for_the_same_number_of_steps():
    assert ps.epochs_for(600, 250, 32) == 86.0  # 7 full batches an epoch.
    assert ps.epochs_for(600, 1000, 32) == 20.0
    assert ps.epochs_for(600, 10, 32) == 600.0  # Fewer images than a batch still steps once an epoch.


def test_finetunes_share_pretrainings_validation_carve_and_never_test(tmp_path):
    shared = tmp_path / "shared" / "data"
    pre = ps.pretrain_config(
        "convnext", "distillation", shared=shared, data_dir=None, overrides=["train.num_epochs=3"]
    )
    assert pre.loss.distillation.teacher == str(
        shared.parent / "weights" / recipes.IMAGENET_MOBILENET_V2_FILE
    )
    run = tmp_path / "pretrain_run"
    fine = ps.finetune_config(
        "convnext/distillation",
        250,
        shared=shared,
        data_dir=None,
        min_steps=600,
        eval_steps=100,
        pretrained=run,
    )
    scratch = ps.finetune_config(
        "convnext/scratch", 250, shared=shared, data_dir=None, min_steps=600, eval_steps=100, pretrained=None
    )
    ref = ps.finetune_config(
        ps.REFERENCE, 1000, shared=shared, data_dir=None, min_steps=600, eval_steps=100, pretrained=None
    )
    assert (pre.train.num_epochs, fine.train.num_epochs, ref.train.num_epochs) == (3.0, 86.0, 5.0)
    assert (fine.train.eval_every_epochs, ref.train.eval_every_epochs) == (15.0, 1.0)  # 105 steps; recipe.
    assert fine.init_from.path == str(run) and scratch.init_from.path is None
    assert ref.init_from.path == pre.loss.distillation.teacher
    for config in (fine, scratch, ref):
        assert config.data.test_split == "" and config.data.manual_dir == str(shared / "chest_xray")
    assert (fine.data.builder_kwargs.train_examples, ref.data.builder_kwargs.train_examples) == (250, 1000)
    carve = fine.data.builder_kwargs.to_dict()
    del carve["train_examples"]
    assert carve == {k: v for k, v in pre.data.builder_kwargs.items() if k != "train_examples"}
    assert (pre.data.image_size, pre.data.channels) == (fine.data.image_size, fine.data.channels)


def test_table_gives_each_start_its_gain_over_the_same_students_scratch():
    row = lambda auc: {"auc": auc, "wall_time_s": 60.0}  # noqa: E731
    record = {
        "written": "now",
        "dataset": "chest_xray",
        "command": "python launch/pretrained_starts.py",
        "sizes": [250, 1000],
        "min_steps": 600,
        "eval_steps": 100,
        "table": {
            ps.REFERENCE: {250: row(0.9), 1000: row(0.95)},
            "convnext/scratch": {250: row(0.7), 1000: row(0.8)},
            "convnext/distillation": {250: row(0.78), 1000: row(0.82)},
        },
        "pretraining": {
            "convnext/distillation": {"epochs": 10.0, "wall_time_s": 600.0, "validation": {"loss": 0.3}}
        },
    }
    assert ps.gains(record["table"]) == {
        "convnext/distillation": {250: pytest.approx(0.08), 1000: pytest.approx(0.02)}
    }
    lines = ps.markdown(record).splitlines()
    assert "| convnext/distillation | 0.780 (+0.080) | 0.820 (+0.020) | 2.0 min |" in lines
    assert f"| {ps.REFERENCE} | 0.900 | 0.950 | 2.0 min |" in lines
    assert "| convnext/distillation | 10 | 10.0 min | 0.3000 | nan |" in lines


def test_seeds_are_averaged_and_their_spread_shown():
    runs = [{"auc": a, "wall_time_s": 30.0} for a in (0.6, 0.7, 0.8)]
    cell = ps.summarise(runs)
    assert cell["auc"] == pytest.approx(0.7) and cell["auc_sd"] == pytest.approx(0.1)
    assert cell["wall_time_s"] == 90.0 and cell["runs"] == runs
    assert ps.summarise(runs[:1])["auc_sd"] is None
    scratch = ps.summarise([{"auc": a, "wall_time_s": 30.0} for a in (0.5, 0.6, 0.7)])
    record = {
        "written": "now",
        "dataset": "ucsd_covid_ct",
        "pool": "ucsd_covid_ct",
        "command": "python launch/pretrained_starts.py --seeds=0,1,2",
        "sizes": [250],
        "seeds": [0, 1, 2],
        "min_steps": 600,
        "eval_steps": 100,
        "finetune_set": ["optim.learning_rate=1e-4"],
        "table": {"convnext/scratch": {250: scratch}, "convnext/distillation": {250: cell}},
        "pretraining": {},
    }
    text = ps.markdown(record)
    assert "| convnext/distillation | 0.700 ± 0.100 (+0.100) | 1.5 min |" in text.splitlines()
    assert "mean ± sd over seeds 0, 1, 2" in text and "`optim.learning_rate=1e-4`" in text
    assert "pretrained on the UCSD COVID-CT training images" not in text  # No pretraining run in it.
    record["pretraining"] = {
        "convnext/distillation": {"epochs": 100.0, "wall_time_s": 60.0, "validation": {"loss": 0.2}}
    }
    assert "pretrained on the UCSD COVID-CT training images" in ps.markdown(record)


def test_ucsd_finetunes_keep_the_students_recipe_on_ucsds_own_split(tmp_path):
    shared = tmp_path / "data"
    kwargs = {"shared": shared, "data_dir": None, "min_steps": 600, "eval_steps": 100, "pretrained": None}
    kermany = ps.finetune_config("mednext_plos/scratch", 250, **kwargs)
    ucsd = ps.finetune_config("mednext_plos/scratch", 250, dataset="ucsd_covid_ct", **kwargs)
    ref = ps.finetune_config(ps.REFERENCE, 250, dataset="ucsd_covid_ct", **kwargs)
    assert (ucsd.data.name, ucsd.data.manual_dir, ref.data.name) == (
        "ucsd_covid_ct",
        str(shared / "ucsd_covid_ct"),
        "ucsd_covid_ct",
    )
    assert (ucsd.data.builder_kwargs.image_size, ucsd.data.builder_kwargs.channels) == (64, 1)
    assert ucsd.data.builder_kwargs.train_examples == ref.data.builder_kwargs.train_examples == 250
    assert ucsd.data.builder_kwargs.group_pattern == ""  # UCSD's defaults, not Kermany's patient key.
    assert ucsd.optim.to_dict() == kermany.optim.to_dict() and ucsd.model.to_dict() == kermany.model.to_dict()
    slower = ps.finetune_config(
        "mednext_plos/scratch",
        250,
        dataset="ucsd_covid_ct",
        overrides=["optim.learning_rate=1e-4"],
        seed=2,
        **kwargs,
    )
    assert slower.optim.learning_rate == 1e-4 and ucsd.optim.learning_rate == 1e-3
    assert (slower.seed, ucsd.seed) == (2, 0)
    assert ps.settings_suffix(["optim.learning_rate=1e-4"]) == "_learning_rate1e-4"
    assert ps.settings_suffix([]) == ""


def test_pretraining_pool_is_the_named_datasets_training_images_on_its_own_validation(tmp_path):
    shared = tmp_path / "data"
    pre = ps.pretrain_config(
        "mednext_plos",
        "distillation",
        shared=shared,
        data_dir=None,
        pool="ucsd_covid_ct",
        overrides=["loss.distillation.teacher_image_size=224"],
    )
    fine = ps.finetune_config(
        "mednext_plos/distillation",
        250,
        dataset="ucsd_covid_ct",
        shared=shared,
        data_dir=None,
        min_steps=600,
        eval_steps=100,
        pretrained=tmp_path / "run",
    )
    assert (pre.data.name, pre.data.manual_dir) == ("ucsd_covid_ct", str(shared / "ucsd_covid_ct"))
    assert pre.loss.distillation.teacher_image_size == 224
    split = {k: v for k, v in fine.data.builder_kwargs.items() if k != "train_examples"}
    assert split == {k: v for k, v in pre.data.builder_kwargs.items() if k != "train_examples"}
    assert pre.data.builder_kwargs.train_examples == 0  # Every training image, labelled or not.
