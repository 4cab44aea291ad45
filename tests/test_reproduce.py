"""launch/reproduce.py, the script behind RESULTS.md: its table, recipes and reuse of stored evaluations.

Training real experiments takes an hour, so these tests feed its functions the session's two smoke runs
(an ensemble of two) and their evaluation, as ``run_experiment`` would.
"""

import dataclasses
import importlib.util
import json
import os

import pytest

from medjax.evaluate import command as evaluate
from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("reproduce", ROOT / "launch" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)

BOOTSTRAP = 20


@pytest.fixture(scope="module")
def ensemble(smoke_run, second_smoke_run, tfds_data_dir, tmp_path_factory):
    """(workdirs, evaluation report path, run_experiment's result) for an ensemble of the smoke runs."""
    workdirs = [smoke_run, second_smoke_run]
    out = tmp_path_factory.mktemp("reproduce") / "evaluation"
    evaluation = evaluate.evaluate_run(
        workdirs, out=out, data_dir=str(tfds_data_dir), bootstrap_samples=BOOTSTRAP, latency_runs=1
    )
    experiment = reproduce.Experiment(
        "smoke_pair",
        "configs/chest_xray.py:smoke",
        "synthetic",
        "nothing published",
        {"auc": 0.0, "accuracy": 1.01},
        seeds=(0, 1),
    )
    entry = {"recipe": "bbb", "commit": "1234567", "first_test": "2026-12-01 23:05 UTC", "evaluations": 1}
    cv = {
        "recipe": "ccc",
        "folds": 5,
        "summary": {"auc": {"mean": 0.91, "sd": 0.02}, "accuracy": {"mean": 0.8, "sd": 0.03}},
    }
    result = {
        "experiment": dataclasses.asdict(experiment),
        "workdirs": [str(w) for w in workdirs],
        "train": [json.loads((w / "report.json").read_text()) for w in workdirs],
        "evaluation": evaluation,
        "protocol": {"recipe": "bbb", "cv_recipe": "ccc", "history": [{**entry, "after": ["aaa"]}], "cv": cv},
    }
    return workdirs, out / "report.json", result


def test_target_text_shows_the_digits_that_decide_it():
    exp = {"targets": {"auc": 0.92, "accuracy": 0.9}}
    test = {"auc": {"value": 0.91995}, "accuracy": {"value": 0.95}}
    # 0.91995 rounds to 0.920 and to 0.9200 (it is 0.919950000000000023 in binary), so five digits.
    assert reproduce.target_text(exp, test) == "auc 0.91995 < 0.92 ✗; accuracy 0.950 ≥ 0.9 ✓"


def test_markdown_row_and_recipe_of_an_ensemble(ensemble, monkeypatch):
    workdirs, _, result = ensemble
    monkeypatch.setattr(reproduce.allocator, "active", lambda: "system")  # What describe() explains.
    text = reproduce.markdown(
        {"smoke_pair": result},
        skipped={"kermany": "no data at `x`"},
        started="2026-11-23 04:00",
        command="python launch/reproduce.py",
        note="A test.",
        bootstrap_samples=BOOTSTRAP,
        shared=ROOT.parent / "shared" / "data",
    )
    lines = text.splitlines()
    table = lines[: lines.index("## Recipes and published comparisons")]
    (row,) = [line for line in table if line.startswith("| smoke_pair |")]
    test = result["evaluation"]["splits"]["test"]["metrics"]
    accuracy, auc = test["accuracy"], test["auc"]
    assert row.startswith("| smoke_pair | mobilenet_v2, ensemble of 2 | 32x32x1 |")
    assert f"| {accuracy['value']:.3f} [{accuracy['low']:.3f}, {accuracy['high']:.3f}] |" in row
    assert f"auc {auc['value']:.3f} ≥ 0.0 ✓; accuracy {accuracy['value']:.3f} < 1.01 ✗ |" in row
    params = result["evaluation"]["model_card"]["profile"]["params"]
    assert f"| {params / 1e6:.2f} M |" in row  # The members' parameters, summed.
    assert any(line.startswith("| kermany | skipped: no data at `x` |") for line in lines)
    assert f"({BOOTSTRAP} stratified resamples of the test set)" in text
    # The header gives the allocator as a training command's first log line does, with its cost and fix.
    assert "This invocation's memory allocator (medjax/allocator.py): system (no fast allocator found" in text
    assert "Note: A test." in lines
    for seed, train in zip((0, 1), result["train"], strict=True):
        val = train["validation"]
        alone = f"alone, validation accuracy {val['accuracy']:.3f}, AUC {val['auc']:.3f}."
        assert any(line.startswith(f"- Seed {seed}: ") and line.endswith(alone) for line in lines)
    # The locked protocol, visible: recipe, commit, first test date, and the earlier recipe seen on test.
    assert row.endswith(
        "| bbb @ 1234567, test first 2026-12-01 23:05 UTC; ⚠ test was seen for 1 earlier recipe(s) (aaa) |"
    )
    assert "- Recipe chosen: not said." in lines
    (cv_row,) = [
        line for line in lines[lines.index("## Cross-validation beside test") :] if "smoke_pair" in line
    ]
    tested = f"{auc['value']:.3f} | {accuracy['value']:.3f}"
    assert cv_row == f"| smoke_pair | 0.910 ± 0.020 | 0.800 ± 0.030 | 5 | {tested} | yes |"
    assert "--config.data.manual_dir=../shared/data/synthetic`" in text  # As typed from the repository.
    folder = reproduce._shown(workdirs[0].parent)  # Relative to the repository, as the reader types it.
    assert f"workdirs `{folder}/seed_<k>`, evaluated together by" in text
    assert "- Published: nothing published." in lines


def test_a_stored_evaluation_is_reused_only_for_these_runs_as_they_are(ensemble):
    workdirs, path, _ = ensemble
    reused = reproduce.reusable_evaluation(path, workdirs, bootstrap_samples=BOOTSTRAP)
    assert [m["workdir"] for m in reused["members"]] == [str(w) for w in workdirs]
    assert reproduce.reusable_evaluation(path, workdirs, bootstrap_samples=1000) is None
    assert reproduce.reusable_evaluation(path, workdirs[:1], bootstrap_samples=BOOTSTRAP) is None
    member_report = workdirs[1] / "report.json"
    stat = member_report.stat()
    os.utime(member_report, (stat.st_atime, path.stat().st_mtime + 10))  # Retrained after the evaluation.
    try:
        assert reproduce.reusable_evaluation(path, workdirs, bootstrap_samples=BOOTSTRAP) is None
    finally:
        os.utime(member_report, (stat.st_atime, stat.st_mtime))


def test_a_recipe_changed_after_its_test_was_seen_is_refused_before_training(tmp_path):
    from medjax import protocol

    ledger = protocol.TestLedger(tmp_path / "ledger.json")
    ledger.record("smoke", keys={"optim.learning_rate": 1.0}, commit="1234567")
    (tmp_path / "shared" / "synthetic").mkdir(parents=True)
    exp = reproduce.Experiment("smoke", "configs/chest_xray.py:smoke", "synthetic", "", {})
    kwargs = {
        "shared": tmp_path / "shared",
        "root": tmp_path / "runs",
        "data_dir": None,
        "bootstrap_samples": 1,
    }
    with pytest.raises(protocol.RecipeChangedError, match="smoke: test was first evaluated"):
        reproduce.run_experiment(exp, ledger=ledger, **kwargs)
    assert not (tmp_path / "runs").exists()  # Refused before any training.
    assert reproduce._cannot_run(reproduce.Experiment("x", "configs/nope.py", "d", "", {}), tmp_path) == (
        "no config yet (`configs/nope.py`)"
    )
    drive = next(e for e in reproduce.EXPERIMENTS if e.name == "drive")
    assert reproduce._cannot_run(drive, tmp_path).startswith("the table is classification-only")
