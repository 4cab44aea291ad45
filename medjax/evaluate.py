"""Judges a trained run (or an ensemble): ``python -m medjax.evaluate --workdir=runs/covid_ct-synthetic``.

Restores the run's best checkpoint (:func:`medjax.trained.load_trained`), predicts every example of the
evaluation splits once, and writes ``<out>/report.json`` and ``<out>/report.md`` with PNG figures
(default ``<out>`` = ``<workdir>/evaluation``), plus ``predictions_<split>.csv`` so every number can be
recomputed. Given ``--workdir`` more than once it judges the ensemble of those runs: the mean of their
class probabilities (soft voting, MONAI's ``MeanEnsemble``), each member preprocessing images as it was
trained to; the members must share class names and evaluation data, and the report needs ``--out``.
What it reports and why is in :mod:`medjax.evaluation`; pictures and Markdown in
:mod:`medjax.eval_report`; the model card's measurements in :mod:`medjax.profiling`.

``--splits`` takes roles: ``validation`` and ``test`` mean the run's ``config.data.eval_split`` and
``config.data.test_split``; any other name is a split of the dataset as is (e.g. ``train``). Binary
decision thresholds are chosen on ``validation`` and applied to the others. The run's data must be
reachable: ``--data_dir`` overrides the TFDS directory it was trained with.

Examples::

    python -m medjax.evaluate --workdir=runs/covid_ct-synthetic
    python -m medjax.evaluate --workdir=/work/runs/smoke_ref --data_dir=/tmp/tfds --bootstrap_samples=200
    python -m medjax.evaluate --workdir=runs/seed0 --workdir=runs/seed1 --out=runs/ensemble
"""

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from absl import app, flags

from medjax import cli, config_lib, eval_report, evaluation, profiling, trained
from medjax.data import pipeline
from medjax.errors import MedjaxError
from medjax.metrics import classification_metrics, probabilities


def predict_split(
    model: trained.TrainedModel, data_cfg, *, split: str, forward: Callable | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels (N,), probs (N, K))`` of every example of ``split`` in storage order, padding dropped.

    Logits come off the device and the softmax runs in float64 (:func:`medjax.metrics.probabilities`),
    as in training's evaluation: a float32 softmax rounds confident scores to ties, which AUC then sees.
    Pass the same ``forward`` (``model.logits_fn``) for several splits to compile once.
    """
    forward = forward or model.logits_fn
    labels, logits, index = [], [], []
    for batch in pipeline.iterate_eval(data_cfg, split=split):
        mask = batch["mask"]
        logits.append(np.asarray(forward(model.variables, batch["image"]))[mask])
        labels.append(batch["label"][mask])
        index.append(batch["index"][mask])
    order = np.argsort(np.concatenate(index))
    probs = probabilities(np.concatenate(logits)[order])
    return np.concatenate(labels)[order].astype(np.int64), probs


def model_card(model: trained.TrainedModel, *, latency_runs: int = 10) -> dict:
    """Size, compute, latency, training data, recipe and training summary of a run (JSON-ready)."""
    config, workdir = model.config, model.workdir
    info = json.loads((workdir / "dataset.json").read_text())
    recipe = {
        "model_name": config.model_name,
        "model": config.model.to_dict(),
        "init_from": config.get("init_from", {}).get("path"),
        "optimizer": config.optim.name,
        "learning_rate": config.optim.learning_rate,
        "weight_decay": config.optim.weight_decay,
        "schedule": config.optim.schedule,
        "epochs": config.train.num_epochs,
        "batch_size": config.data.batch_size,
        "image_size": f"{config.data.image_size}x{config.data.image_size}x{config.data.channels}",
        "loss": config.loss.to_dict(),
        "augmentations": {k: v for k, v in config.data.augment.to_dict().items() if v},
        "seed": config.seed,
    }
    report_path = workdir / "report.json"
    training = None
    if report_path.is_file():
        saved = json.loads(report_path.read_text())
        keys = ("steps", "total_steps", "best_step", "stopped_early", "wall_time_s")
        training = {k: saved[k] for k in keys if k in saved}
    return {
        "profile": profiling.inference_profile(
            model.model, model.variables, image_shape=model.image_shape, runs=latency_runs
        ),
        "training_data": {
            "dataset": config.data.name,
            "class_names": info["class_names"],
            "label_counts": info["label_counts"],
        },
        "recipe": recipe,
        "training": training,
    }


def _settings(config, **overrides) -> dict:
    """``config.eval`` of the run (base defaults for runs older than it), then the non-None overrides."""
    saved = config.eval.to_dict() if "eval" in config else {}
    return (
        config_lib.base_config().eval.to_dict()
        | saved
        | {k: v for k, v in overrides.items() if v is not None}
    )


def _resolve_splits(data_cfg, splits: Sequence[str]) -> dict[str, str]:
    """``{role: dataset split}``; roles validation/test map to the run's eval/test splits.

    Raises:
      MedjaxError: for a split the dataset does not have (listing those it has).
    """
    # A run trained with test_split '' never looked at test; its test role is the dataset's 'test'.
    named = {"validation": data_cfg.eval_split, "test": data_cfg.test_split or "test"}
    resolved = {role: named.get(role, role) for role in splits}
    _, info = pipeline.load_source(data_cfg, data_cfg.eval_split)
    unknown = [s for s in resolved.values() if s.split("[")[0] not in info.splits]  # 'train[:10%]' is fine.
    if unknown:
        raise MedjaxError(
            f"Unknown split(s) {unknown} of {data_cfg.name}; --splits takes validation, test or one of "
            f"{sorted(info.splits)}."
        )
    return resolved


def _thresholds(predictions: dict, *, target: float) -> dict:
    """Youden and target-sensitivity thresholds chosen on validation, evaluated on every split."""
    if "validation" not in predictions:
        return {"note": "Not chosen: the validation split was not among --splits."}
    labels, probs = predictions["validation"]
    chosen = {
        "youden": evaluation.youden_threshold(labels=labels, scores=probs[:, 1]),
        f"sensitivity>={target:g}": evaluation.threshold_for_sensitivity(
            labels=labels, scores=probs[:, 1], target=target
        ),
    }
    rules = {}
    for rule, threshold in chosen.items():
        rules[rule] = {"threshold": threshold}
        for role, (y, p) in predictions.items():
            rules[rule][role] = evaluation.operating_point(labels=y, scores=p[:, 1], threshold=threshold)
    return {"chosen_on": "validation", "rules": rules}


def predict_members(
    members: Sequence[trained.TrainedModel], *, splits: Sequence[str], data_dir: str | None
) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """``{role: (split, labels, probs)}``: each member's predictions of each split, probabilities averaged.

    Every member reads the split through its own config (its preprocessing, image size and channels),
    so members trained differently can still be combined, as long as they read the same examples.

    Raises:
      MedjaxError: when a member reads another dataset or split for a role than the first member, or
        its labels (in storage order) differ, naming the two runs.
    """
    combined: dict[str, tuple[tuple, np.ndarray, list[np.ndarray]]] = {}
    for member in members:
        data_cfg = member.config.data
        if data_dir is not None:
            data_cfg.data_dir = data_dir
        forward = member.logits_fn
        for role, split in _resolve_splits(data_cfg, splits).items():
            source = (data_cfg.name, split)
            labels, probs = predict_split(member, data_cfg, split=split, forward=forward)
            if role not in combined:
                combined[role] = (source, labels, [probs])
                continue
            first_source, first_labels, collected = combined[role]
            if source != first_source or not np.array_equal(labels, first_labels):
                raise MedjaxError(
                    f"{member.workdir} and {members[0].workdir} were evaluated on different {role} data "
                    f"(dataset and split {source} and {first_source}, {len(labels)} and {len(first_labels)} "
                    "examples): an ensemble's members must share their dataset and splits."
                )
            collected.append(probs)
    return {
        role: (split, labels, np.mean(collected, axis=0))
        for role, ((_, split), labels, collected) in combined.items()
    }


def ensemble_card(cards: Sequence[dict]) -> dict:
    """The model card of an ensemble: totals of the members' profiles (their latencies add, as the
    members run one after another), the first member's training data and recipe, every member's card."""
    profiles = [card["profile"] for card in cards]
    summed = ("params", "params_mb", "gflops_per_image", "latency_b1_ms")
    total = {key: sum(p[key] for p in profiles) for key in summed} | {"device": profiles[0]["device"]}
    return {
        "profile": total,
        "training_data": cards[0]["training_data"],
        "recipe": cards[0]["recipe"],
        "members": list(cards),
    }


def evaluate_run(
    workdirs: str | Path | Sequence[str | Path],
    *,
    out: str | Path | None = None,
    splits: Sequence[str] = ("validation", "test"),
    data_dir: str | None = None,
    seed: int = 0,
    stratified: bool = True,
    bootstrap_samples: int | None = None,
    target_sensitivity: float | None = None,
    calibration_bins: int | None = None,
    latency_runs: int = 10,
) -> dict:
    """Evaluates a run directory, or the ensemble of several, and writes the report; returns the
    ``report.json`` dict.

    Args:
      workdirs: the run directory, or a sequence of them (an ensemble: mean class probabilities).
      out: report directory (created), default ``<workdir>/evaluation``; required for an ensemble.
      splits: roles ``validation`` / ``test`` or dataset split names.
      data_dir: overrides the runs' ``config.data.data_dir``.
      seed, stratified: of the bootstrap resamples (see :mod:`medjax.evaluation`).
      bootstrap_samples, target_sensitivity, calibration_bins: None takes the (first) run's
        ``config.eval`` value.
      latency_runs: timed forward passes behind the model card's median latency.

    Raises:
      MedjaxError: when a workdir is not a run with a best checkpoint, its data cannot be found, or the
        members of an ensemble disagree on class names or evaluation data.
    """
    paths = [Path(workdirs)] if isinstance(workdirs, str | Path) else [Path(w) for w in workdirs]
    if not paths:
        raise MedjaxError("No run to evaluate: pass at least one --workdir.")
    if len(paths) > 1 and out is None:
        raise MedjaxError("An ensemble's report belongs to none of its runs: pass --out.")
    members = [trained.load_trained(path) for path in paths]
    class_names = members[0].class_names
    for member in members[1:]:
        if member.class_names != class_names:
            raise MedjaxError(
                f"{member.workdir} has classes {list(member.class_names)} but {members[0].workdir} has "
                f"{list(class_names)}: an ensemble's members must share their class names and order."
            )
    settings = _settings(
        members[0].config,
        bootstrap_samples=bootstrap_samples,
        target_sensitivity=target_sensitivity,
        calibration_bins=calibration_bins,
    ) | {"seed": seed, "stratified": stratified}
    out = Path(out) if out is not None else paths[0] / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    predicted = predict_members(members, splits=splits, data_dir=data_dir)
    predictions = {role: (labels, probs) for role, (_, labels, probs) in predicted.items()}
    report = {
        "members": [{"workdir": str(m.workdir), "checkpoint_step": m.step} for m in members],
        "class_names": list(class_names),
        "settings": settings,
    }
    if len(class_names) == 2:
        report["thresholds"] = _thresholds(predictions, target=settings["target_sensitivity"])
    report["splits"] = {
        role: {"split": predicted[role][0]}
        | _judge_split(out, role, labels=labels, probs=probs, settings=settings, report=report)
        for role, (labels, probs) in predictions.items()
    }
    cards = [model_card(member, latency_runs=latency_runs) for member in members]
    report["model_card"] = cards[0] if len(cards) == 1 else ensemble_card(cards)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(eval_report.markdown(report))
    return report


def _judge_split(out: Path, role: str, *, labels, probs, settings: dict, report: dict) -> dict:
    """Metrics with intervals, calibration, per-class report and figures of one split's predictions."""
    names = report["class_names"]
    points = {rule: ops[role] for rule, ops in report.get("thresholds", {}).get("rules", {}).items()}
    calibration = evaluation.calibration(labels=labels, probs=probs, num_bins=settings["calibration_bins"])
    confusion = classification_metrics(labels=labels, probs=probs)["confusion_matrix"]
    _write_predictions(out / f"predictions_{role}.csv", labels=labels, probs=probs, class_names=names)
    return {
        "num_examples": len(labels),
        "label_counts": np.bincount(labels, minlength=len(names)).tolist(),
        "metrics": evaluation.bootstrap_intervals(
            labels=labels,
            probs=probs,
            num_samples=settings["bootstrap_samples"],
            seed=settings["seed"],
            stratified=settings["stratified"],
        ),
        "confusion_matrix": confusion,
        "calibration": calibration,
        "per_class": evaluation.per_class_report(labels=labels, probs=probs, class_names=names),
        "figures": {
            "curves": eval_report.plot_curves(
                out / f"{role}_curves.png", labels=labels, probs=probs, class_names=names, points=points
            ),
            "confusion": eval_report.plot_confusion(
                out / f"{role}_confusion.png", confusion=confusion, class_names=names
            ),
            "reliability": eval_report.plot_reliability(
                out / f"{role}_reliability.png", calibration=calibration
            ),
        },
    }


def _write_predictions(
    path: Path, *, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> None:
    """One CSV row per example (position in the split, label, probabilities at full float64 precision)."""
    header = ",".join(["index", "label", *(f"p_{name}" for name in class_names)])
    rows = np.column_stack([np.arange(len(labels)), labels, probs])
    np.savetxt(
        path, rows, delimiter=",", header=header, comments="", fmt=["%d", "%d"] + ["%.17g"] * len(class_names)
    )


def _define_flags() -> None:
    """Flags exist only when run as a program, so importing this module (e.g. from launch/reproduce.py)
    defines no absl flags that could clash with the importer's."""
    flags.DEFINE_multi_string(
        "workdir", None, "Run directory of `python -m medjax.launch`; repeat for an ensemble.", required=True
    )
    flags.DEFINE_string("out", None, "Report directory (default: <workdir>/evaluation; ensembles need one).")
    flags.DEFINE_list("splits", ["validation", "test"], "Roles (validation, test) or split names.")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir, if not the one the run was trained with.")
    flags.DEFINE_integer("bootstrap_samples", None, "Default: the run's config.eval value.")
    flags.DEFINE_float("target_sensitivity", None, "Default: the run's config.eval value.")
    flags.DEFINE_integer("calibration_bins", None, "Default: the run's config.eval value.")
    flags.DEFINE_integer("seed", 0, "Seed of the bootstrap resamples (same seed, same intervals).")
    flags.DEFINE_bool("stratified", True, "Resample within each class (see medjax.evaluation).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cli.setup()
    try:
        report = evaluate_run(
            f.workdir,
            out=f.out,
            splits=f.splits,
            data_dir=f.data_dir,
            seed=f.seed,
            stratified=f.stratified,
            bootstrap_samples=f.bootstrap_samples,
            target_sensitivity=f.target_sensitivity,
            calibration_bins=f.calibration_bins,
        )
    except MedjaxError as e:
        raise SystemExit(f"medjax: error: {e}") from None
    out = Path(f.out) if f.out else Path(f.workdir[0]) / "evaluation"
    for role, split in report["splits"].items():
        m = split["metrics"]
        print(
            f"{role}: "
            + ", ".join(f"{k} {v['value']:.4f} [{v['low']:.4f}, {v['high']:.4f}]" for k, v in m.items())
        )
    print(f"Report: {out / 'report.md'}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
