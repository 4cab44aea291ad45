"""Evaluation statistics against hand-computed values, and ``python -m medjax.evaluate`` end to end."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from medjax import run_dir
from medjax.errors import MedjaxError
from medjax.evaluate import command as evaluate
from medjax.evaluate import statistics as evaluation
from medjax.metrics import classification_metrics, probabilities
from tests.conftest import ROOT


def _binary(p1) -> np.ndarray:
    p1 = np.asarray(p1, np.float64)
    return np.stack([1 - p1, p1], axis=1)


def test_expected_calibration_error_by_hand():
    # Confidences 0.95 (right), 0.85 (right), 0.7 (wrong), 0.65 (right), 0.55 (wrong); 5 bins of width 0.2.
    # (0.8, 1]: conf 0.9, acc 1 -> 0.1; (0.6, 0.8]: conf 0.675, acc 0.5 -> 0.175; (0.4, 0.6]: 0.55 vs 0.
    # ECE = 2/5 * 0.1 + 2/5 * 0.175 + 1/5 * 0.55 = 0.22.
    labels = np.array([1, 0, 0, 0, 0])
    result = evaluation.calibration(labels=labels, probs=_binary([0.95, 0.15, 0.7, 0.35, 0.55]), num_bins=5)
    assert result["ece"] == pytest.approx(0.22)
    assert [b["count"] for b in result["bins"]] == [0, 0, 1, 2, 2]
    assert result["bins"][3]["confidence"] == pytest.approx(0.675)
    assert result["bins"][3]["accuracy"] == pytest.approx(0.5)


def test_thresholds_by_hand():
    # Thresholds (score >= t positive) -> (sensitivity, specificity): 0.9 (1/3, 1), 0.8 (2/3, 1),
    # 0.6 (2/3, 2/3), 0.4 (2/3, 1/3), 0.35 (1, 1/3), 0.1 (1, 0). Youden's J is largest (2/3) at 0.8; the
    # highest threshold with sensitivity >= 0.9 is 0.35.
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.6, 0.35, 0.8, 0.9])
    assert evaluation.youden_threshold(labels=labels, scores=scores) == 0.8
    assert evaluation.threshold_for_sensitivity(labels=labels, scores=scores, target=0.9) == 0.35
    op = evaluation.operating_point(labels=labels, scores=scores, threshold=0.8)
    assert op["sensitivity"] == pytest.approx(2 / 3) and op["specificity"] == 1.0
    assert op["ppv"] == 1.0 and op["npv"] == pytest.approx(3 / 4)
    assert op["confusion_matrix"] == [[3, 0], [1, 2]]
    with pytest.raises(ValueError, match="both classes"):
        evaluation.youden_threshold(labels=np.zeros(3), scores=scores[:3])


def test_probabilities_keep_confident_scores_apart():
    # In float32, softmax([0, 17]) is exactly 1.0 (e^-17 < eps / 2), so these three would tie at 1.
    probs = probabilities(np.array([[0.0, 17.0], [0.0, 18.0], [0.0, 25.0]], np.float32))
    assert probs[0, 1] == pytest.approx(1 / (1 + np.exp(-17)), rel=1e-15)
    assert np.all(np.diff(probs[:, 1]) > 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_average_precision_by_hand():
    # Ranked: 0.9 pos (P 1, R 1/2), 0.8 neg, 0.7 pos (P 2/3, R 1): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    # (the trapezoidal area under the same curve would be larger).
    labels = np.array([1, 0, 1, 0])
    assert evaluation.average_precision(labels=labels, probs=_binary([0.9, 0.8, 0.7, 0.1])) == pytest.approx(
        5 / 6
    )
    assert np.isnan(evaluation.average_precision(labels=np.ones(4, int), probs=_binary([0.9, 0.8, 0.7, 0.1])))


@pytest.mark.parametrize("num_classes, n", [(2, 30), (2, 7), (4, 50)])
def test_bootstrap_statistic_matches_classification_metrics(num_classes, n):
    rng = np.random.default_rng(num_classes * n)
    labels = rng.integers(0, num_classes, n)
    probs = rng.dirichlet(np.ones(num_classes), n)
    fast = evaluation.summary_metrics(labels=labels, probs=probs)
    reference = classification_metrics(labels=labels, probs=probs)
    for key in ("accuracy", "balanced_accuracy", "auc", "f1"):
        assert fast[key] == pytest.approx(reference[key], abs=1e-12), key


def _scored_sample(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    return labels, _binary(np.clip(0.3 * labels + rng.uniform(0.1, 0.7, n), 0, 1))


def test_bootstrap_is_reproducible_and_brackets_the_estimate():
    labels, probs = _scored_sample()
    first = evaluation.bootstrap_intervals(labels=labels, probs=probs, num_samples=200, seed=3)
    again = evaluation.bootstrap_intervals(labels=labels, probs=probs, num_samples=200, seed=3)
    other = evaluation.bootstrap_intervals(labels=labels, probs=probs, num_samples=200, seed=4)
    assert first == again
    assert any(first[k]["low"] != other[k]["low"] or first[k]["high"] != other[k]["high"] for k in first)
    for name, m in first.items():
        assert m["low"] <= m["value"] <= m["high"], name
        assert m["low"] < m["high"] and m["resamples"] == 200 and m["skipped"] == 0, name
    assert first["accuracy"]["value"] == classification_metrics(labels=labels, probs=probs)["accuracy"]


def test_stratified_resamples_keep_class_counts_unstratified_ones_skip_undefined_auc():
    labels = np.array([0, 0, 0, 0, 1, 1])
    strat = evaluation.bootstrap_indices(labels, num_samples=50, seed=0)
    assert all(np.bincount(labels[idx]).tolist() == [4, 2] for idx in strat)
    probs = _binary([0.1, 0.2, 0.6, 0.3, 0.7, 0.9])
    free = evaluation.bootstrap_intervals(
        labels=labels, probs=probs, num_samples=200, seed=0, stratified=False
    )
    # P(no positive among 6 draws) = (4/6)^6 ~ 0.088, P(no negative) = (2/6)^6 ~ 0.001: ~18 of 200 skipped.
    assert 5 <= free["auc"]["skipped"] <= 40
    assert free["auc"]["skipped"] + free["auc"]["resamples"] == 200
    assert free["accuracy"]["skipped"] == 0


def test_evaluate_cli_core_on_a_trained_run(smoke_run, tfds_data_dir, tmp_path):
    out = tmp_path / "evaluation"
    report = evaluate.evaluate_run(
        smoke_run, out=out, data_dir=str(tfds_data_dir), bootstrap_samples=20, latency_runs=2
    )
    saved = json.loads((out / "report.json").read_text())
    assert set(saved) == {
        "members",
        "class_names",
        "settings",
        "thresholds",
        "splits",
        "model_card",
    }
    assert saved["settings"]["bootstrap_samples"] == 20 and saved["settings"]["target_sensitivity"] == 0.9
    assert set(saved["splits"]) == {"validation", "test"}
    assert set(saved["thresholds"]["rules"]) == {"youden", "sensitivity>=0.9"}
    # The training loop's own evaluation of the same checkpoint: predictions must agree.
    trained_report = json.loads((smoke_run / "report.json").read_text())
    for role in ("validation", "test"):
        split = saved["splits"][role]
        assert set(split["metrics"]) == set(evaluation.INTERVAL_METRICS)
        assert split["metrics"]["auc"]["value"] == pytest.approx(trained_report[role]["auc"], abs=1e-6)
        assert split["confusion_matrix"] == trained_report[role]["confusion_matrix"]
        for file in split["figures"].values():
            assert (out / file).is_file() and (out / file).read_bytes()[:4] == b"\x89PNG"
    card = saved["model_card"]
    assert card["profile"]["params"] == trained_report["num_params"]
    assert card["profile"]["gflops_per_image"] > 0 and card["profile"]["latency_b1_ms"] > 0
    assert card["training"]["best_step"] == trained_report["best_step"]
    assert saved["members"] == [{"workdir": str(smoke_run), "checkpoint_step": trained_report["best_step"]}]
    markdown = (out / "report.md").read_text()
    assert "![test reliability](test_reliability.png)" in markdown and "## Model card" in markdown
    assert report["splits"]["test"]["num_examples"] == sum(card["training_data"]["label_counts"]["test"])
    with pytest.raises(MedjaxError, match=r"Unknown split.*'tset'.*validation, test or one of"):
        evaluate.evaluate_run(smoke_run, out=tmp_path / "typo", data_dir=str(tfds_data_dir), splits=["tset"])


def test_ensemble_report_is_of_the_members_mean_probabilities(
    smoke_run, second_smoke_run, tfds_data_dir, tmp_path
):
    runs = [smoke_run, second_smoke_run]
    members = [run_dir.load_run(run) for run in runs]
    singles = [evaluate.predict_members([m], splits=["test"], data_dir=str(tfds_data_dir)) for m in members]
    labels, first, second = (
        singles[0]["test"]["label"],
        singles[0]["test"]["probs"],
        singles[1]["test"]["probs"],
    )
    assert np.abs(first - second).max() > 1e-3  # Distinct members, so a mean differs from either.
    out = tmp_path / "ensemble"
    report = evaluate.evaluate_run(
        runs, out=out, data_dir=str(tfds_data_dir), bootstrap_samples=20, latency_runs=1
    )
    written = np.loadtxt(out / "predictions_test.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(written[:, 1], labels)
    np.testing.assert_allclose(written[:, 2:], (first + second) / 2, rtol=1e-15)
    auc = report["splits"]["test"]["metrics"]["auc"]["value"]
    assert auc == pytest.approx(skm.roc_auc_score(labels, (first[:, 1] + second[:, 1]) / 2), abs=1e-12)
    assert [m["workdir"] for m in report["members"]] == [str(run) for run in runs]
    card = report["model_card"]
    assert card["profile"]["params"] == 2 * card["members"][0]["profile"]["params"]
    markdown = (out / "report.md").read_text()
    assert "an ensemble of 2 runs" in markdown and "| 2 | epochs `0.125`, seed `1` |" in markdown

    with pytest.raises(MedjaxError, match="pass --out"):
        evaluate.evaluate_run(runs, data_dir=str(tfds_data_dir))
    other = shutil.copytree(second_smoke_run, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["data"]["test_split"] = config["data"]["eval_split"]
    (other / "config.json").write_text(json.dumps(config))
    mixed = r"different test data \(dataset and split \('synthetic_ct', 'validation'\) and \('synthetic_ct'"
    with pytest.raises(MedjaxError, match=mixed):
        evaluate.evaluate_run([smoke_run, other], out=out, splits=["test"], data_dir=str(tfds_data_dir))
    info = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps(info | {"class_names": info["class_names"][::-1]}))
    with pytest.raises(MedjaxError, match=r"must share their task and class names \(in order\)"):
        evaluate.evaluate_run([smoke_run, other], out=out, data_dir=str(tfds_data_dir))


def test_evaluate_cli_rejects_a_directory_that_is_not_a_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "medjax.evaluate", f"--workdir={tmp_path}"],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "medjax: error:" in proc.stderr and "not a medjax run directory" in proc.stderr
    assert "Traceback" not in proc.stderr
