"""What ``python -m medjax.evaluate`` does: :func:`evaluate_run` on one run or an ensemble.

Restores the run's best checkpoint (:func:`medjax.run_dir.load_run`), predicts every example of the
evaluation splits once (:mod:`medjax.inference`), and writes ``<out>/report.json`` and ``<out>/report.md``
with PNG figures (default ``<out>`` = the run's ``evaluation/``), plus per-example predictions so every
number can be recomputed. Given several runs it judges their ensemble, each member preprocessing images
as it was trained to; the members must share task, class names and evaluation data, and the report
needs ``out``. What is computed, drawn and written for a split is the task's (:mod:`medjax.tasks`).

``splits`` takes roles: ``validation`` and ``test`` mean the run's ``config.data.eval_split`` and
``config.data.test_split``; any other name is a split of the dataset as is (e.g. ``train``). The run's
data must be reachable: ``data_dir`` overrides the TFDS directory it was trained with.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medjax import config_lib, inference, run_dir
from medjax.data import pipeline
from medjax.errors import MedjaxError
from medjax.evaluate import markdown, model_card
from medjax.finite import check_outputs


def predict_split(model: run_dir.TrainedModel, data_cfg, *, split: str) -> dict:
    """``{'index', 'label', <the task's eval outputs>}`` of every example of ``split``, in storage order.

    Raises:
      NonFiniteOutputError: when an output holds NaN or infinity (a damaged checkpoint).
    """
    outputs = inference.predict_split(
        lambda batch: model.outputs_fn(model.variables, batch), data_cfg, split=split
    )
    for key, value in outputs.items():
        if key not in ("index", "label") and np.issubdtype(np.asarray(value).dtype, np.floating):
            what = f"{model.workdir} (best checkpoint, step {model.step}) on split {split} ({key})"
            check_outputs(np.asarray(value), what=what)
    return outputs


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


def predict_members(
    members: Sequence[run_dir.TrainedModel], *, splits: Sequence[str], data_dir: str | None
) -> dict[str, dict]:
    """``{role: {'split', 'examples', 'label', ...}}``: each member's predictions of each split, combined
    by the task's ``ensemble`` (for one member, its own predictions in the task's judged form), and the
    split's non-image fields (``examples``, :func:`medjax.data.pipeline.example_info`: ids, and for
    segmentation the cases, slice positions and spacings that volume metrics need).

    Every member reads the split through its own config (its preprocessing, image size and channels),
    so members trained differently can still be combined, as long as they read the same examples.

    Raises:
      MedjaxError: when a member reads another dataset or split for a role than the first member, or
        its labels (in storage order) differ, naming the two runs.
    """
    collected: dict[str, tuple[tuple, list[dict]]] = {}
    for member in members:
        data_cfg = member.config.data
        if data_dir is not None:
            data_cfg.data_dir = data_dir
        for role, split in _resolve_splits(data_cfg, splits).items():
            source = (data_cfg.name, split)
            predicted = predict_split(member, data_cfg, split=split)
            if role not in collected:
                collected[role] = (source, [predicted], pipeline.example_info(data_cfg, split))
                continue
            first_source, first = collected[role][0], collected[role][1][0]
            if source != first_source or not np.array_equal(predicted["label"], first["label"]):
                raise MedjaxError(
                    f"{member.workdir} and {members[0].workdir} were evaluated on different {role} data "
                    f"(dataset and split {source} and {first_source}, {len(predicted['label'])} and "
                    f"{len(first['label'])} examples): an ensemble's members must share their dataset and "
                    "splits."
                )
            collected[role][1].append(predicted)
    task = members[0].task
    return {
        role: {"split": source[1], "examples": info} | task.ensemble(preds)
        for role, (source, preds, info) in collected.items()
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
      workdirs: the run directory, or a sequence of them (an ensemble).
      out: report directory (created), default the run's ``evaluation/``; required for an ensemble.
      splits: roles ``validation`` / ``test`` or dataset split names.
      data_dir: overrides the runs' ``config.data.data_dir``.
      seed, stratified: of the bootstrap resamples (see :mod:`medjax.evaluate.statistics`).
      bootstrap_samples, target_sensitivity, calibration_bins: None takes the (first) run's
        ``config.eval`` value.
      latency_runs: timed forward passes behind the model card's median latency.

    Raises:
      MedjaxError: when a workdir is not a run with a best checkpoint, its data cannot be found, or the
        members of an ensemble disagree on task, class names or evaluation data.
    """
    paths = [Path(workdirs)] if isinstance(workdirs, str | Path) else [Path(w) for w in workdirs]
    if not paths:
        raise MedjaxError("No run to evaluate: pass at least one --workdir.")
    if len(paths) > 1 and out is None:
        raise MedjaxError("An ensemble's report belongs to none of its runs: pass --out.")
    members = [run_dir.load_run(path) for path in paths]
    first = members[0]
    for member in members[1:]:
        if (member.class_names, member.task) != (first.class_names, first.task):
            raise MedjaxError(
                f"{member.workdir} ({member.task.__name__}, classes {list(member.class_names)}) and "
                f"{first.workdir} ({first.task.__name__}, classes {list(first.class_names)}) differ: an "
                "ensemble's members must share their task and class names (in order)."
            )
    settings = _settings(
        first.config,
        bootstrap_samples=bootstrap_samples,
        target_sensitivity=target_sensitivity,
        calibration_bins=calibration_bins,
    ) | {"seed": seed, "stratified": stratified}
    out = Path(out) if out is not None else first.run_dir.evaluation_dir
    out.mkdir(parents=True, exist_ok=True)
    predictions = predict_members(members, splits=splits, data_dir=data_dir)
    report = {
        "members": [{"workdir": str(m.workdir), "checkpoint_step": m.step} for m in members],
        "settings": settings,
        **first.task.judge(predictions, out=out, class_names=first.class_names, settings=settings),
    }
    cards = [model_card.model_card(member, latency_runs=latency_runs) for member in members]
    report["model_card"] = cards[0] if len(cards) == 1 else model_card.ensemble_card(cards)
    json_path, markdown_path = run_dir.report_paths(out)
    json_path.write_text(json.dumps(report, indent=2, default=float))
    markdown_path.write_text(markdown.markdown(report, first.task))
    return report
