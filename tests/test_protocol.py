"""The locked test protocol: recipe digests, the test ledger, and the cross-validation script's pieces."""

import datetime
import json
import sys

import pytest

from medjax import config_lib, protocol
from tests.conftest import ROOT, SMOKE

sys.path.insert(0, str(ROOT / "launch"))  # The launch scripts import their siblings.
import cross_validate
import reproduce


def _smoke() -> dict:
    return config_lib.load_config_file(SMOKE).to_dict()


def test_recipe_digest_ignores_where_and_how_watched_but_not_what_is_learned():
    base = _smoke()
    moved = json.loads(json.dumps(base))
    moved["data"]["manual_dir"], moved["data"]["data_dir"] = "/elsewhere", "/tfds"
    moved["seed"], moved["train"]["progress_bar"], moved["data"]["test_split"] = 7, True, ""
    moved["data"]["builder_kwargs"].update({"cv_folds": 5, "cv_fold": 3})
    assert protocol.recipe_digest(moved) == protocol.recipe_digest(base)
    changed = json.loads(json.dumps(base))
    changed["optim"]["learning_rate"] *= 2
    assert protocol.recipe_digest(changed) != protocol.recipe_digest(base)
    assert protocol.recipe_digest(base, seeds=[0, 1]) != protocol.recipe_digest(base, seeds=[0])
    assert len(protocol.recipe_digest(base)) == 12


def test_ledger_counts_reruns_refuses_a_changed_recipe_and_records_it_when_allowed(tmp_path):
    path = tmp_path / "ledger.json"
    first_day = datetime.datetime(2026, 12, 1, 23, 5, tzinfo=datetime.UTC)
    ledger = protocol.TestLedger(path)
    old = protocol.recipe(_smoke())
    assert ledger.check("x", old) == "new"
    ledger.record("x", keys=old, commit="1234567", now=first_day)
    ledger.record("x", keys=old, commit="1234567")  # A rerun of the same recipe only counts.
    reread = protocol.TestLedger(path)  # It is a file in the repository, not memory.
    entry = reread.current("x")
    assert (entry["recipe"], entry["commit"], entry["first_test"]) == (
        protocol.digest(old),
        "1234567",
        "2026-12-01 23:05 UTC",
    )
    assert (entry["evaluations"], entry["after"]) == (2, [])
    new = {**old, "optim.learning_rate": 1.0}
    with pytest.raises(protocol.RecipeChangedError, match=r"x: test was first evaluated on 2026-12-01 23:05.*"
                       r"differs in optim.learning_rate\. .*--allow_recipe_change"):  # fmt: skip
        reread.record("x", keys=new, commit="89abcde")
    assert protocol.TestLedger(path).history("x") == reread.history("x")  # Nothing recorded.
    entry = reread.record("x", keys=new, commit="89abcde", allow_change=True)
    assert (entry["after"], entry["evaluations"]) == ([protocol.digest(old)], 1)
    assert len(protocol.TestLedger(path).history("x")) == 2


def test_a_key_medjax_gained_at_its_default_does_not_change_a_recipe():
    new = protocol.recipe(_smoke())
    old = {k: v for k, v in new.items() if k != "train.ema_decay"}  # A recipe from before the key.
    assert protocol.changed_keys(old, new) == []
    assert protocol.changed_keys(old, {**new, "train.ema_decay": 0.99}) == ["train.ema_decay"]
    assert protocol.changed_keys(new, old) == ["train.ema_decay"]  # A key removed is a change.
    builder_default = {k: v for k, v in new.items() if k != "data.builder_kwargs.seed"}
    assert protocol.changed_keys(builder_default, new) == ["data.builder_kwargs.seed"]  # Data may differ.
    config = _smoke()
    assert "data.builder_kwargs.train_examples" not in new  # Gained later, left out at its neutral value ...
    config["data"]["builder_kwargs"]["train_examples"] = 250
    assert protocol.recipe(config)["data.builder_kwargs.train_examples"] == 250  # ... but not when set.
    assert protocol.recipe_digest(config) != protocol.recipe_digest(_smoke())


def test_every_experiment_in_the_ledger_is_tested_for_its_config_as_it_stands():
    """results/test_ledger.json's current recipe of every row is its config today, so RESULTS.md's test
    numbers are of the recipes in configs/ (a recipe edited since its test was seen shows here, and
    reproduce.py then refuses it). The Kermany rows settled before the protocol were tested again for their
    patient-carved recipes; DRIVE's entry is the recipe its test was first evaluated for by hand
    (results/segmentation_drive.md)."""
    ledger = protocol.TestLedger(ROOT / "results" / "test_ledger.json")
    for exp in reproduce.EXPERIMENTS:
        assert ledger.current(exp.name) is not None, exp.name
        config = config_lib.load_config_file(str(ROOT / exp.config)).to_dict()
        keys = protocol.recipe(config, seeds=list(exp.seeds), init_from=exp.init_from)
        assert ledger.changes(exp.name, keys) == [], exp.name
    seeded = ledger.history("chest_xray_convnext")
    assert len(seeded) == 2 and seeded[-1]["after"], "the re-run records the recipe tested before it"


def test_last_commit_names_the_config_and_dirty_state(tmp_path):
    commit = protocol.last_commit("configs/chest_xray.py", repo=ROOT)
    assert commit == "unknown" or len(commit.split("+")[0]) >= 7
    assert protocol.last_commit("x.py", repo=tmp_path) == "unknown"  # Not a git checkout.


def test_fold_config_sets_the_fold_and_never_tests():
    config = config_lib.load_config_file(SMOKE)
    fold = cross_validate.fold_config(config, folds=5, fold=2)
    assert (fold.data.builder_kwargs.cv_folds, fold.data.builder_kwargs.cv_fold, fold.data.test_split) == (
        5,
        2,
        "",
    )
    assert "cv_folds" not in config.data.builder_kwargs and config.data.test_split == "test"  # A copy.
    assert protocol.recipe_digest(fold.to_dict()) == protocol.recipe_digest(config.to_dict())


def test_summary_is_mean_and_sample_sd_over_folds_and_markdown_lists_them(tmp_path):
    reports = [
        {"validation": {"auc": a, "accuracy": b, "loss": 0.5}}
        for a, b in ((0.8, 0.7), (0.9, 0.8), (1.0, 0.9))
    ]
    summary = cross_validate.summarize(reports)
    assert summary["auc"]["mean"] == pytest.approx(0.9) and summary["auc"]["sd"] == pytest.approx(0.1)
    assert summary["loss"] == {"mean": 0.5, "sd": 0.0, "folds": [0.5, 0.5, 0.5]}
    assert "balanced_accuracy" not in summary  # Absent from the reports.
    text = cross_validate.markdown(
        summary, spec="configs/x.py", digest="abc", commit="1234567", workdir=tmp_path, written="now"
    )
    assert "| auc | 0.900 ± 0.100 | 0.800 | 0.900 | 1.000 |" in text.splitlines()
    fold_reports = [
        {"validation": {"step": 9, "mean_dice": d, "pixel_dice_vessel": d, "pixel_auc": 0.9}}
        for d in (0.7, 0.8)
    ]
    seg = cross_validate.summarize(fold_reports)
    assert list(seg) == ["mean_dice", "pixel_dice_vessel", "pixel_auc"]  # Segmentation's, in METRICS order.
    assert seg["pixel_dice_vessel"]["mean"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least 2"):
        cross_validate.cross_validate(config_lib.load_config_file(SMOKE), folds=1, workdir=tmp_path)
