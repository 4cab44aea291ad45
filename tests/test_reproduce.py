"""launch/reproduce.py and launch/results_markdown.py, the scripts behind RESULTS.md: the records kept
per experiment, the tables and recipes rendered from them, reuse of stored runs and evaluations, and the
cross-validation read when rendering.

Training real experiments takes an hour, so these tests feed its functions the session's two smoke runs
(an ensemble of two) and their evaluation, as ``run_experiment`` would, and run one segmentation experiment
end to end on the seconds-long ``configs/drive.py:smoke``.
"""

import dataclasses
import json
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from medjax import protocol
from medjax.evaluate import command as evaluate
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "launch"))  # reproduce.py imports its sibling results_markdown.
import reproduce
import results_markdown

BOOTSTRAP = 20
SHARED = ROOT.parent / "shared" / "data"


def rendered(tmp_path, results: dict, *, cv: dict, only=None, skipped=None, note=None) -> tuple[str, dict]:
    """(RESULTS.md, the records) of ``results`` (``run_experiment``'s) as ``reproduce.py`` renders them:
    records written to and read back from ``tmp_path``, cross-validation summaries ``cv`` from a folder
    beside them. Rendering the records before they were written gives the same text."""
    invocation = results_markdown.invocation(
        only=only,
        started="2026-11-23 04:00",
        note=note,
        bootstrap_samples=BOOTSTRAP,
        shared=SHARED,
        experiments=list(results),
        skipped=skipped or {},
    )
    records = {n: results_markdown.record(r, shared=SHARED, written="by a test") for n, r in results.items()}
    results_markdown.write(tmp_path / "records", invocation, records.values())
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    for name, summary in cv.items():
        results_markdown.cv_path(name, cv_dir).write_text(json.dumps(summary))
    text = results_markdown.markdown(*results_markdown.read(tmp_path / "records"), cv_dir=cv_dir)
    assert text == results_markdown.markdown(invocation, records, cv_dir=cv_dir)  # A record round-trips.
    return text, records


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
    result = {
        "experiment": dataclasses.asdict(experiment),
        "workdirs": [str(w) for w in workdirs],
        "train": [json.loads((w / "report.json").read_text()) for w in workdirs],
        "evaluation": evaluation,
        "protocol": {"recipe": "bbb", "cv_recipe": "ccc", "history": [{**entry, "after": ["aaa"]}]},
    }
    return workdirs, out / "report.json", result


def test_target_text_shows_the_digits_that_decide_it():
    exp = {"targets": {"auc": 0.92, "accuracy": 0.9}}
    test = {"auc": {"value": 0.91995}, "accuracy": {"value": 0.95}}
    # 0.91995 rounds to 0.920 and to 0.9200 (it is 0.919950000000000023 in binary), so five digits.
    assert results_markdown.target_text(exp, test) == "auc 0.91995 < 0.92 ✗; accuracy 0.950 ≥ 0.9 ✓"


def test_markdown_row_and_recipe_of_an_ensemble(ensemble, monkeypatch, tmp_path):
    workdirs, _, result = ensemble
    monkeypatch.setattr(results_markdown.allocator, "active", lambda: "system")  # What describe() explains.
    cv = {
        "recipe": "ccc",
        "folds": 5,
        "summary": {"auc": {"mean": 0.91, "sd": 0.02}, "accuracy": {"mean": 0.8, "sd": 0.03}},
    }
    text, _ = rendered(
        tmp_path,
        {"smoke_pair": result},
        cv={"smoke_pair": cv},
        skipped={"kermany": "no data at `x`"},
        note="A test.",
    )
    lines = text.splitlines()
    table = lines[lines.index("## Classification") : lines.index("## Not run")]
    assert "## Segmentation" not in lines  # No segmentation result, no table.
    (row,) = [line for line in table if line.startswith("| smoke_pair |")]
    test = result["evaluation"]["splits"]["test"]["metrics"]
    accuracy, auc = test["accuracy"], test["auc"]
    assert row.startswith("| smoke_pair | mobilenet_v2, ensemble of 2 | 32x32x1 |")
    assert f"| {accuracy['value']:.3f} [{accuracy['low']:.3f}, {accuracy['high']:.3f}] |" in row
    assert f"auc {auc['value']:.3f} ≥ 0.0 ✓; accuracy {accuracy['value']:.3f} < 1.01 ✗ |" in row
    params = result["evaluation"]["model_card"]["profile"]["params"]
    assert f"| {params / 1e6:.2f} M |" in row  # The members' parameters, summed.
    assert lines[lines.index("## Not run") + 2] == "- kermany: no data at `x`."
    assert f"({BOOTSTRAP} resamples of the test set)" in text
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
    tested = f"accuracy {accuracy['value']:.3f}, AUC {auc['value']:.3f}"
    assert cv_row == f"| smoke_pair | accuracy 0.800 ± 0.030, AUC 0.910 ± 0.020 | 5 | {tested} | yes |"
    assert "--config.data.manual_dir=../shared/data/synthetic`" in text  # As typed from the repository.
    folder = results_markdown.shown(workdirs[0].parent)  # Relative to the repository, as the reader types it.
    assert f"workdirs `{folder}/seed_<k>`, evaluated together by" in text
    assert "- Published: nothing published." in lines
    assert lines[2].startswith("Written by `python launch/reproduce.py` on 2026-11-23 04:00 (UTC), finished ")
    # The record holds the ensemble's runs without their run directories: no path outside the repository's
    # spelling, and only the metrics the rows quote.
    record = json.loads((tmp_path / "records" / "smoke_pair.json").read_text())
    assert record["workdirs"] == [results_markdown.shown(w) for w in workdirs]
    assert set(record["test"]) == {"accuracy", "auc", "f1"}
    assert record["wall_time_s"] == sum(train["wall_time_s"] for train in result["train"])


def test_rows_of_experiments_an_invocation_did_not_run_are_their_records(ensemble, tmp_path):
    """``--only`` renders the other experiments' rows from their records, and says so; an experiment it
    skipped keeps the row of its record, and the reason says whose it is."""
    _, _, result = ensemble
    text, _ = rendered(
        tmp_path, {"smoke_pair": result}, cv={}, only=["other"], skipped={"smoke_pair": "no data at `x`"}
    )
    lines = text.splitlines()
    assert lines[2].startswith("Written by `python launch/reproduce.py --only=other` on ")
    assert lines[2].endswith(
        "; the rows of experiments it did not run are their records in `results/reproduce/`."
    )
    assert any(line.startswith("| smoke_pair | mobilenet_v2, ensemble of 2 |") for line in lines)
    assert "- smoke_pair: no data at `x`; its row above is the record of an earlier run." in lines
    assert "| smoke_pair | none yet | |" in text  # No results/cv/smoke_pair.json.


def test_results_md_is_what_the_committed_records_render():
    """RESULTS.md is rendered from ``results/reproduce/`` and ``results/cv/`` alone, so a cross-validation
    added later shows after ``python launch/results_markdown.py``, without the runs."""
    invocation, records = results_markdown.read()
    assert list(records) == [exp.name for exp in reproduce.EXPERIMENTS]
    assert results_markdown.markdown(invocation, records) == (ROOT / "RESULTS.md").read_text()


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


SEG_SMOKE = reproduce.Experiment(
    "seg_smoke",
    "configs/drive.py:smoke",
    "synthetic",
    "nothing published",
    {"pixel_dice_lesion": 0.9, "pixel_auc": 0.1},  # Neither near what 8 steps reach.
    budget_s=600.0,
    chosen="by a test",
    details="results/segmentation_drive.md",
)


def _plain(value):
    """``value`` as JSON holds it (tuples as lists, numpy scalars as floats), as results.json stores it."""
    return json.loads(json.dumps(value, default=float))


@pytest.fixture(scope="module")
def segmentation(tfds_data_dir, tmp_path_factory):
    """(run_experiment's keyword arguments, ledger, result) of the segmentation smoke experiment: trained,
    evaluated on validation and test, recorded in a fresh ledger."""
    tmp = tmp_path_factory.mktemp("reproduce_segmentation")
    (tmp / "shared" / "synthetic").mkdir(parents=True)
    kwargs = {
        "shared": tmp / "shared",
        "root": tmp / "runs",
        "data_dir": str(tfds_data_dir),
        "bootstrap_samples": BOOTSTRAP,
    }
    ledger = protocol.TestLedger(tmp / "ledger.json")
    return kwargs, ledger, reproduce.run_experiment(SEG_SMOKE, ledger=ledger, **kwargs)


def test_a_segmentation_experiment_is_evaluated_on_test_once_and_read_back(segmentation):
    from medjax.run_dir import RunDir

    kwargs, ledger, result = segmentation
    (train,) = result["train"]
    assert train["steps"] == train["total_steps"] == 8  # 64 images, batch 8, one epoch.
    assert "test" not in train  # Training never evaluated test; the evaluation below did.
    splits = result["evaluation"]["splits"]
    assert {role: s["num_examples"] for role, s in splits.items()} == {"validation": 24, "test": 24}
    assert {"pixel_dice_lesion", "pixel_auc", "mean_hd95"} <= set(splits["test"]["metrics"])
    entry = ledger.current("seg_smoke")
    assert (entry["recipe"], entry["evaluations"], entry["commit"]) == (
        result["protocol"]["recipe"],
        1,
        protocol.last_commit("configs/drive.py", repo=ROOT),
    )
    assert result["protocol"]["history"] == [entry]
    report = RunDir(result["workdirs"][0]).report_file
    finished = report.stat().st_mtime_ns
    again = reproduce.run_experiment(SEG_SMOKE, ledger=ledger, **kwargs)  # Read back, not redone.
    assert report.stat().st_mtime_ns == finished
    assert _plain(again["evaluation"]) == _plain(result["evaluation"])
    assert protocol.TestLedger(ledger.path).current("seg_smoke")["evaluations"] == 1


def test_markdown_of_a_segmentation_row_its_human_level_and_cross_validation(
    segmentation, monkeypatch, tmp_path
):
    _, _, result = segmentation
    result = _plain(result)
    split = result["evaluation"]["splits"]["test"]
    test = split["metrics"]
    # A test split with a second rater (DRIVE's) carries its point metrics as the task's judge writes them.
    human = {
        "pixel_dice_lesion": 0.7891,
        "pixel_accuracy": 0.9473,
        "sensitivity": 0.7746,
        "specificity": 0.9725,
    }
    split["human"] = {"second_observer": human}
    cv = {
        "recipe": "0123456789ab",
        "folds": 3,
        "summary": {"mean_dice": {"mean": 0.5, "sd": 0.125}, "pixel_auc": {"mean": 0.9, "sd": 0.05}},
    }
    monkeypatch.setattr(results_markdown.allocator, "active", lambda: "system")
    text, records = rendered(tmp_path, {"seg_smoke": result}, cv={"seg_smoke": cv})
    lines = text.splitlines()
    assert "## Classification" not in lines and "## Not run" not in lines
    table = lines[lines.index("## Segmentation") : lines.index("## Recipes and published comparisons")]
    assert table[4] == "| " + " | ".join(results_markdown._SEGMENTATION_COLUMNS) + " |"
    (row,) = [line for line in table if line.startswith("| seg_smoke |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]

    def interval(key):
        m = test[key]
        return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"

    minutes = result["train"][0]["wall_time_s"] / 60
    entry = result["protocol"]["history"][-1]
    params = result["evaluation"]["model_card"]["profile"]["params"]
    dice, auc = test["pixel_dice_lesion"]["value"], test["pixel_auc"]["value"]
    assert cells == [
        "seg_smoke",
        "unet",
        "32x32x1 patches, whole images at evaluation",
        "8/8",
        f"{minutes:.1f} min, glibc (≤ 10)",
        interval("pixel_dice_lesion"),
        interval("pixel_auc"),
        interval("pixel_accuracy"),
        f"{test['sensitivity']['value']:.3f}",
        f"{test['specificity']['value']:.3f}",
        f"{test['mean_hd95']['value']:.2f} px",
        f"{params / 1e6:.2f} M",
        f"{result['evaluation']['model_card']['profile']['params_mb']:.1f} MB",
        f"pixel_dice_lesion {dice:.3f} < 0.9 ✗; pixel_auc {auc:.3f} ≥ 0.1 ✓",
        f"{entry['recipe']} @ {entry['commit']}, test first {entry['first_test']}",
    ]
    assert (
        "| seg_smoke: second observer vs the reference | human | | | | 0.789 | - | 0.947 | 0.775 | 0.973 "
        in ("\n".join(table))
    )
    val = result["evaluation"]["splits"]["validation"]["metrics"]
    assert f"- Validation: mean Dice {val['mean_dice']['value']:.3f} [" in text
    assert "- Details (candidates, earlier runs, curves): `results/segmentation_drive.md`." in lines
    assert "- Recipe chosen: by a test." in lines
    (cv_row,) = [
        line for line in lines[lines.index("## Cross-validation beside test") :] if "seg_smoke" in line
    ]
    tested = f"mean Dice {test['mean_dice']['value']:.3f}, pixel AUC {auc:.3f}"
    crossed = "mean Dice 0.500 ± 0.125, pixel AUC 0.900 ± 0.050 | 3"
    assert cv_row == f"| seg_smoke | {crossed} | {tested} | no (CV of 0123456789ab) |"
    results_markdown.cv_path("seg_smoke", tmp_path / "cv").unlink()
    assert (
        results_markdown.cv_lines(records, tmp_path / "cv")[-1] == f"| seg_smoke | none yet | | {tested} | |"
    )


@pytest.mark.parametrize("exp", reproduce.EXPERIMENTS, ids=lambda exp: exp.name)
def test_cross_validating_an_experiments_config_names_its_recipe(exp, tmp_path):
    """``launch/cross_validate.py --config=<the experiment's config> --config.data.manual_dir=<its data>
    --out=results/cv/<experiment>`` writes where reproduce reads, under the digest reproduce compares with
    (cross_validate takes ``protocol.recipe_digest`` of the config as absl's config flag loads it)."""
    shared = tmp_path / "shared"
    argv = [
        "cross_validate.py",
        f"--config={ROOT / exp.config}",
        f"--config.data.manual_dir={shared / exp.data}",
    ]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    cross_validated = protocol.recipe_digest(values["config"].value.to_dict())
    config = reproduce.experiment_config(exp, shared=shared, root=tmp_path / "runs", data_dir=None)
    assert cross_validated == protocol.recipe_digest(config.to_dict())
    assert results_markdown.cv_path(exp.name) == ROOT / "results" / "cv" / f"{exp.name}.json"  # Its --out.
