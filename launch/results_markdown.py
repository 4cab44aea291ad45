"""RESULTS.md from the records ``launch/reproduce.py`` keeps in ``results/reproduce/`` and the
cross-validation in ``results/cv/``: a table per task, each experiment's recipe and published comparison,
and the cross-validation of each recipe beside its test numbers.

Runs take hours and stay on the machine that trained them, so RESULTS.md is rendered from committed
records alone: ``results/reproduce/<experiment>.json`` holds everything RESULTS.md says of one experiment
(:func:`record`: the values of its run config that a row quotes, its runs' steps, wall time, test and
validation metrics, size and test-ledger entry), ``results/reproduce/invocation.json`` the header's facts
of the reproduce.py invocation that last wrote it, the rows' order and what it skipped
(:func:`invocation`). ``reproduce.py`` writes both, then renders; a cross-validation finished later (read
from ``results/cv/<experiment>.json`` at every rendering) or a change of wording here needs no run::

  python launch/results_markdown.py       # results/reproduce/ + results/cv/ -> RESULTS.md

Every row, whatever its task, ends with the same Recipe cell (:mod:`medjax.protocol`: the recipe's digest,
the last commit of its config, the date test was first evaluated for it and any earlier recipe whose test
was seen), and every experiment gets the same recipe section. What differs by task is the table's metric
columns: classification reports accuracy, AUC and F1 with the thresholds chosen on validation;
segmentation reports pooled pixel metrics inside the valid region (DRIVE's field of view), HD95 and,
where the test split has a second rater, that rater's row as the human level.
"""

import datetime
import json
import os
import platform
from collections.abc import Iterable
from pathlib import Path

from absl import app, flags

from medjax import allocator

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results" / "reproduce"  # <experiment>.json per experiment, and INVOCATION.
INVOCATION = "invocation.json"
CV = ROOT / "results" / "cv"  # Where launch/cross_validate.py --out=results/cv/<experiment> writes.

# Per task, the metrics quoted side by side wherever one line sums a split up: the validation line of a
# recipe, an ensemble member alone, and the cross-validation table (keys of the task's validation
# metrics, which the evaluation report also holds for test, and how RESULTS.md names them).
HEADLINE = {
    "classification": (("accuracy", "accuracy"), ("auc", "AUC")),
    "segmentation": (("mean_dice", "mean Dice"), ("pixel_auc", "pixel AUC")),
}
# Per task, the test metrics of a row's cells besides the HEADLINE ones and the targets (segmentation's
# F1, a metric named after the foreground class, is the record's "f1"); and a second rater's, besides F1.
_ROW_METRICS = {
    "classification": ("accuracy", "auc", "f1"),
    "segmentation": ("pixel_auc", "pixel_accuracy", "sensitivity", "specificity", "mean_hd95"),
}
_HUMAN_METRICS = ("pixel_accuracy", "sensitivity", "specificity")

_CLASSIFICATION_COLUMNS = (
    "Experiment", "Model", "Input", "Epochs", "Wall time", "Test accuracy", "Test AUC", "Test F1", "Sens.",
    "Spec.", "Params", "Size", "Target", "Recipe",
)  # fmt: skip
_SEGMENTATION_COLUMNS = (
    "Experiment", "Model", "Input", "Steps", "Wall time", "Test F1 (pixel Dice)", "Test pixel AUC",
    "Test accuracy", "Sens.", "Spec.", "HD95", "Params", "Size", "Target", "Recipe",
)  # fmt: skip


def _define_flags() -> None:
    """Defined only when run as a program: launch/reproduce.py imports this module beside its own flags."""
    flags.DEFINE_string("records", str(RECORDS), "Folder of the records launch/reproduce.py writes.")
    flags.DEFINE_string("output", str(ROOT / "RESULTS.md"), "Markdown results table.")


def shown(path: str | Path) -> str:
    """A path as the reader should type it from the repository root (relative when that is shorter)."""
    return os.path.relpath(path, ROOT) if Path(path).is_absolute() else str(path)


def task_of(config: dict) -> str:
    """A run config's task (runs from before medjax had tasks are classification)."""
    return config.get("task", "classification")


def cv_path(name: str, cv_dir: Path = CV) -> Path:
    """Where the cross-validation of experiment ``name``'s recipe is read from."""
    return cv_dir / f"{name}.json"


def _run_config(result: dict) -> dict:
    from medjax.run_dir import RunDir

    return RunDir(result["workdirs"][0]).read_config().to_dict()


def record(result: dict, *, shared: Path, written: str) -> dict:
    """Everything RESULTS.md says of one experiment, from ``launch/reproduce.py``'s result of it, so that
    RESULTS.md renders without its runs (``shared``: the data folder its config read; ``written``: when
    and by what, for whoever reads the record). Paths are as typed from the repository; metrics are those
    RESULTS.md quotes, each a number or its value and 95 % interval."""
    exp, runs, evaluation = result["experiment"], result["train"], result["evaluation"]
    config = _run_config(result)
    task = task_of(config)
    headline = [key for key, _ in HEADLINE[task]]
    history = result["protocol"]["history"]
    profile = evaluation["model_card"]["profile"]
    start = config.get("init_from") or {}
    return {
        "experiment": exp,
        "written": written,
        "task": task,
        "config": {  # The run config's values that RESULTS.md quotes.
            "model_name": config["model_name"],
            "data.image_size": config["data"]["image_size"],
            "data.patch_size": config["data"].get("patch_size"),
            "data.channels": config["data"]["channels"],
            "train.num_epochs": config["train"]["num_epochs"],
            "init_from.path": shown(start["path"]) if start.get("path") else None,
            "init_from.reinit_head": start.get("reinit_head"),
        },
        "manual_dir": shown(shared / exp["data"]),
        "workdirs": [shown(w) for w in result["workdirs"]],
        "runs": [_run_record(report, headline if len(runs) > 1 else ()) for report in runs],
        "wall_time_s": sum(report["wall_time_s"] for report in runs),
        # Runs from before medjax chose allocators ran under the system's (glibc's) defaults.
        "allocators": sorted({report.get("allocator", "system") for report in runs}),
        "params": profile["params"],
        "params_mb": profile["params_mb"],
        "validation": _trimmed(evaluation["splits"]["validation"]["metrics"], headline),
        **_test_record(task, evaluation, [*headline, *exp["targets"]]),
        "protocol": {
            "cv_recipe": result["protocol"]["cv_recipe"],  # As launch/cross_validate.py names the recipe.
            "ledger": {k: v for k, v in history[-1].items() if k != "keys"} if history else None,
        },
    }


def _trimmed(metrics: dict, keys: Iterable[str]) -> dict:
    """``metrics`` of ``keys`` (those it holds), each a number or its value and 95 % interval."""

    def trim(entry):
        return (
            {k: entry[k] for k in ("value", "low", "high") if k in entry}
            if isinstance(entry, dict)
            else entry
        )

    return {key: trim(metrics[key]) for key in dict.fromkeys(keys) if key in metrics}


def _run_record(report: dict, headline: Iterable[str]) -> dict:
    """One run's steps and best checkpoint, with its own validation numbers of ``headline`` (given in an
    ensemble, whose recipe section quotes each member alone)."""
    run = {key: report[key] for key in ("steps", "total_steps", "stopped_early", "best_step")}
    if headline:
        run["validation"] = _trimmed(report["validation"], headline)
    return run


def _test_record(task: str, evaluation: dict, quoted: list[str]) -> dict:
    """The test metrics of a row of ``task`` (and the ``quoted`` ones), with what the task adds: the
    sensitivity and specificity at validation's Youden threshold (classification); which metric is the F1,
    the unit of HD95 and any other rater's values, the human level (segmentation)."""
    split = evaluation["splits"]["test"]
    if task == "classification":
        youden = evaluation["thresholds"]["rules"]["youden"]["test"]
        return {
            "test": _trimmed(split["metrics"], [*_ROW_METRICS[task], *quoted]),
            "youden_test": _trimmed(youden, ("sensitivity", "specificity")),
        }
    f1 = f1_key(evaluation["class_names"])
    return {
        "test": _trimmed(split["metrics"], [f1, *_ROW_METRICS[task], *quoted]),
        "f1": f1,
        "distance_unit": split["distance_unit"],
        "human": {rater: _trimmed(v, (f1, *_HUMAN_METRICS)) for rater, v in split.get("human", {}).items()},
    }


def invocation(
    *,
    only: list[str] | None,
    started: str,
    note: str | None,
    bootstrap_samples: int,
    shared: Path,
    experiments: list[str],
    skipped: dict,
) -> dict:
    """The header's facts of a reproduce.py invocation finishing now (``only``: its ``--only``; this
    machine, jax and allocator), the ``experiments`` in the order of RESULTS.md's rows, and those it
    ``skipped``, with why."""
    import jax

    return {
        "only": only,
        "started": started,
        "finished": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}",
        "machine": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "jax": jax.__version__,
        "allocator": allocator.describe(),
        "bootstrap_samples": bootstrap_samples,
        "weights": shown(shared.parent / "weights"),
        "note": note,
        "experiments": list(experiments),
        "skipped": skipped,
    }


def write(folder: Path, inv: dict, records: Iterable[dict]) -> None:
    """Stores :func:`invocation` ``inv`` and each :func:`record` in ``folder``; the records of
    experiments not among ``records`` stay as they are."""
    folder.mkdir(parents=True, exist_ok=True)
    for rec in records:
        _dump(rec, folder / f"{rec['experiment']['name']}.json")
    _dump(inv, folder / INVOCATION)


def _dump(value: dict, path: Path) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=float) + "\n")


def read(folder: Path = RECORDS) -> tuple[dict, dict]:
    """The invocation stored in ``folder`` and, in its row order, the records of its experiments that
    have one (an experiment never run has none)."""
    inv = json.loads((folder / INVOCATION).read_text())
    paths = {name: folder / f"{name}.json" for name in inv["experiments"]}
    return inv, {name: json.loads(path.read_text()) for name, path in paths.items() if path.exists()}


def render(folder: Path, output: Path) -> None:
    """Writes RESULTS.md to ``output`` from the records in ``folder`` and the cross-validation in
    ``results/cv/``."""
    output.write_text(markdown(*read(folder)))


def _interval(metrics: dict, key: str) -> str:
    entry = metrics[key]
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def target_text(exp: dict, test: dict) -> str:
    parts = []
    for key, target in exp["targets"].items():
        value = test[key]["value"]
        digits = 3  # More where rounding would hide the comparison (0.9199 < 0.92, not 0.920 < 0.92).
        while round(value, digits) == target and digits < 6:
            digits += 1
        met = value >= target
        parts.append(f"{key} {value:.{digits}f} {'≥' if met else '<'} {target} {'✓' if met else '✗'}")
    return "; ".join(parts)


def markdown(inv: dict, records: dict, *, cv_dir: Path = CV) -> str:
    """RESULTS.md of :func:`invocation` ``inv`` and each experiment's :func:`record`: a table per task,
    the experiments not run, each experiment's recipe and comparison, and cross-validation (read from
    ``cv_dir``) beside test."""
    by_task = {task: {n: r for n, r in records.items() if r["task"] == task} for task in HEADLINE}
    only = inv["only"]
    command = "python launch/reproduce.py" + (f" --only={','.join(only)}" if only else "")
    others = (
        "; the rows of experiments it did not run are their records in `results/reproduce/`" if only else ""
    )
    lines = [
        "# medjax results on real data",
        "",
        f"Written by `{command}` on {inv['started']} (UTC), finished {inv['finished']} UTC; runs finished "
        f"earlier are read back from their workdirs{others}.",
        f"Machine: {inv['machine']}, {inv['cpu_cores']} CPU cores, no GPU; jax {inv['jax']}. This "
        f"invocation's memory allocator (medjax/allocator.py): {inv['allocator']}; each wall time names "
        "the allocator of its own run. Every model is trained with a fixed seed (0, or one run per seed 0, "
        "1, ... where the row is an ensemble, whose prediction is the mean of its runs' probabilities) from "
        "scratch, or, where its recipe says so, from the best checkpoint of an experiment above or from the "
        f"ImageNet weights in `{inv['weights']}`; test metrics are of the best-on-validation checkpoints, "
        f"with 95 % bootstrap intervals ({inv['bootstrap_samples']} resamples of the test set). Wall time "
        "is training (with its validations) on this machine, dataset preparation excluded, summed over an "
        "ensemble's runs.",
        "",
        "Test protocol (medjax/protocol.py): training never evaluates test; this command evaluates it once "
        "per recipe and records it in `results/test_ledger.json`. The Recipe column gives the recipe's "
        "digest, the last commit of its config file and the date test was first evaluated for it, and says "
        "when test had been evaluated for earlier recipes of the row (peeking). Each recipe section says "
        "how the recipe was chosen; the closing section puts its cross-validation beside its test numbers.",
        *([f"Note: {inv['note']}"] if inv["note"] else []),
    ]
    if by_task["classification"]:
        lines += [
            "",
            "## Classification",
            "",
            "Intervals from stratified resamples of the test images. Sensitivity and specificity are at the "
            "threshold chosen on validation (Youden's J), applied unchanged to test; accuracy, F1 and the "
            "confusion counts use the argmax.",
            "",
            *_header(_CLASSIFICATION_COLUMNS),
            *(_classification_row(n, r) for n, r in by_task["classification"].items()),
        ]
    if by_task["segmentation"]:
        lines += [
            "",
            "## Segmentation",
            "",
            "Pixel metrics pool every pixel inside the valid region (DRIVE: the field of view) against the "
            "reference (DRIVE: the 1st observer), with the argmax class map; F1 is the pooled pixel Dice of "
            "the foreground class, HD95 the mean over images. Intervals from resamples of the test images "
            "(or cases, for volumes). A test split with another rater adds its row: the human level, scored "
            "by the same code.",
            "",
            *_header(_SEGMENTATION_COLUMNS),
            *[row for n, r in by_task["segmentation"].items() for row in _segmentation_rows(n, r)],
        ]
    if inv["skipped"]:
        lines += [
            "",
            "## Not run",
            "",
            *(_not_run(name, reason, records) for name, reason in inv["skipped"].items()),
        ]
    lines += ["", "## Recipes and published comparisons", ""]
    for name, rec in records.items():
        lines += [f"### {name}", *_recipe_lines(rec), ""]
    return "\n".join([*lines, *cv_lines(records, cv_dir)]) + "\n"


def _not_run(name: str, reason: str, records: dict) -> str:
    """Why the invocation did not run ``name``, and whether its row above is an earlier run's record."""
    earlier = "; its row above is the record of an earlier run" if name in records else ""
    return f"- {name}: {reason}{earlier}."


def _header(columns: tuple[str, ...]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _common_cells(rec: dict) -> tuple[str, str]:
    """The Model and Wall time cells, alike for every task."""
    runs = len(rec["runs"])
    model = rec["config"]["model_name"] + (f", ensemble of {runs}" if runs > 1 else "")
    minutes = rec["wall_time_s"] / 60
    budget = rec["experiment"]["budget_s"]
    memory = sorted({name.replace("system", "glibc") for name in rec["allocators"]})
    wall = f"{minutes:.1f} min, {' and '.join(memory)}" + (
        f" ({'≤' if minutes * 60 <= budget else '>'} {budget / 60:.0f})" if budget else ""
    )
    return model, wall


def _size_cells(rec: dict) -> str:
    return f"{rec['params'] / 1e6:.2f} M | {rec['params_mb']:.1f} MB"


def _classification_row(name: str, rec: dict) -> str:
    runs, test, youden, config = rec["runs"], rec["test"], rec["youden_test"], rec["config"]
    num_epochs = config["train.num_epochs"]
    steps_per_epoch = runs[0]["total_steps"] / num_epochs
    epochs = ", ".join(f"{r['steps'] / steps_per_epoch:.0f}" for r in runs) + f"/{num_epochs:.0f}"
    model, wall = _common_cells(rec)
    size = config["data.image_size"]
    return (
        f"| {name} | {model} | {size}x{size}x{config['data.channels']} "
        f"| {epochs} | {wall} | {_interval(test, 'accuracy')} | {_interval(test, 'auc')} "
        f"| {_interval(test, 'f1')} | {youden['sensitivity']:.3f} | {youden['specificity']:.3f} "
        f"| {_size_cells(rec)} | {target_text(rec['experiment'], test)} | {protocol_text(rec)} |"
    )


def f1_key(class_names: list[str]) -> str:
    """The segmentation F1 of RESULTS.md: the foreground's pooled pixel Dice (binary), else the mean
    Dice over classes and images."""
    return f"pixel_dice_{class_names[1]}" if len(class_names) == 2 else "mean_dice"


def _segmentation_rows(name: str, rec: dict) -> list[str]:
    """The experiment's row, then one per other rater of the test split (the human level)."""
    runs, test, f1, config = rec["runs"], rec["test"], rec["f1"], rec["config"]
    steps = ", ".join(str(r["steps"]) for r in runs) + f"/{runs[0]['total_steps']}"
    model, wall = _common_cells(rec)
    patch = config["data.patch_size"]
    side = patch or config["data.image_size"]
    size = f"{side}x{side}x{config['data.channels']}" + (
        " patches, whole images at evaluation" if patch else ""
    )
    unit = "px" if rec["distance_unit"] == "pixels" else rec["distance_unit"]

    def point(values: dict, key: str) -> str:
        value = values.get(key)
        value = value["value"] if isinstance(value, dict) else value
        return "-" if value is None else f"{value:.3f}"

    auc = _interval(test, "pixel_auc") if "pixel_auc" in test else "-"
    rows = [
        f"| {name} | {model} | {size} | {steps} | {wall} | {_interval(test, f1)} | {auc} "
        f"| {_interval(test, 'pixel_accuracy')} | {point(test, 'sensitivity')} "
        f"| {point(test, 'specificity')} "
        f"| {test['mean_hd95']['value']:.2f} {unit} | {_size_cells(rec)} "
        f"| {target_text(rec['experiment'], test)} | {protocol_text(rec)} |"
    ]
    for rater, values in rec["human"].items():
        rows.append(
            f"| {name}: {rater.replace('_', ' ')} vs the reference | human | | | | {point(values, f1)} | - "
            f"| {point(values, 'pixel_accuracy')} | {point(values, 'sensitivity')} "
            f"| {point(values, 'specificity')} | - | | | | |"
        )
    return rows


def protocol_text(rec: dict) -> str:
    """The Recipe cell: digest @ commit, first test date, and any test seen for earlier recipes."""
    entry = rec["protocol"]["ledger"]
    if not entry:
        return "not recorded"
    text = f"{entry['recipe']} @ {entry['commit']}, test first {entry['first_test']}"
    if entry["evaluations"] > 1:
        text += f", evaluated {entry['evaluations']} times"
    if entry["after"]:
        text += f"; ⚠ test was seen for {len(entry['after'])} earlier recipe(s) ({', '.join(entry['after'])})"
    if entry.get("note"):
        text += f"; {entry['note']}"
    return text


def _summary(values: dict, task: str, *, cv: bool) -> str:
    """``'AUC 0.950, accuracy 0.880'`` of a test split's metrics, or with ``cv`` of a cross-validation
    summary (``'AUC 0.910 ± 0.020, ...'``), over the task's :data:`HEADLINE` metrics it holds."""
    parts = []
    for key, label in HEADLINE[task]:
        if key in values:
            v = values[key]
            parts.append(f"{label} {v['mean']:.3f} ± {v['sd']:.3f}" if cv else f"{label} {v['value']:.3f}")
    return ", ".join(parts)


def cv_lines(records: dict, cv_dir: Path = CV) -> list[str]:
    """Closing section: each recipe's cross-validation (mean ± sd over folds, as ``cv_dir`` holds it when
    rendering) beside its test numbers."""
    lines = [
        "",
        "## Cross-validation beside test",
        "",
        "Grouped, stratified K-fold cross-validation on train+validation (`launch/cross_validate.py "
        "--out=results/cv/<experiment>` with the experiment's config, `results/cv/<experiment>.json`); a "
        'recipe is chosen on these numbers, test is the check. "Same recipe" compares the cross-validated '
        "recipe's digest with the tested one's.",
        "",
        "| Experiment | Cross-validation (mean ± sd) | Folds | Test | Same recipe |",
        "|---|---|---|---|---|",
    ]
    for name, rec in records.items():
        tested = _summary(rec["test"], rec["task"], cv=False)
        path = cv_path(name, cv_dir)
        if not path.exists():
            lines.append(f"| {name} | none yet | | {tested} | |")
            continue
        cv = json.loads(path.read_text())
        same = "yes" if cv["recipe"] == rec["protocol"]["cv_recipe"] else f"no (CV of {cv['recipe']})"
        crossed = _summary(cv["summary"], rec["task"], cv=True)
        lines.append(f"| {name} | {crossed} | {cv['folds']} | {tested} | {same} |")
    return lines


def _recipe_lines(rec: dict) -> list[str]:
    """One experiment's config, runs, validation numbers and published comparison."""
    exp, runs, config = rec["experiment"], rec["runs"], rec["config"]
    headline = HEADLINE[rec["task"]]
    workdirs = [Path(w) for w in rec["workdirs"]]
    ensemble = len(workdirs) > 1
    folder = workdirs[0].parent if ensemble else workdirs[0]
    line = f"- Config: `{exp['config']}` with `--config.data.manual_dir={rec['manual_dir']}`"
    if ensemble:
        line += (
            f"; an ensemble of {len(workdirs)} runs, `--config.seed=<k>` for k in "
            f"{', '.join(map(str, exp['seeds']))} in workdirs `{folder}/seed_<k>`, evaluated together by "
            f"`python -m medjax.evaluate --workdir=... --workdir=... --out={folder}/evaluation`"
        )
    else:
        line += f"; workdir `{folder}`"
    lines = [line + f" (`{folder}/evaluation/report.md` has the figures and every number of the evaluation)."]
    if exp["init_from"]:
        lines.append(
            f"- Initialised from the best checkpoint of `{exp['init_from']}` (above), output layer "
            "re-initialised; that run's training time is not in this wall time."
        )
    elif config["init_from.path"]:
        fresh = ", output layer re-initialised" if config["init_from.reinit_head"] else ""
        lines.append(f"- Initialised from `{config['init_from.path']}`{fresh}.")
    for seed, run in zip(exp["seeds"], runs, strict=True):
        steps = (
            f"{run['steps']} of {run['total_steps']} (early stopping: {run['stopped_early']}), best "
            f"checkpoint at step {run['best_step']}"
        )
        if ensemble:
            val = run["validation"]
            alone = ", ".join(f"{label} {val[key]:.3f}" for key, label in headline if key in val)
            lines.append(f"- Seed {seed}: {steps}; alone, validation {alone}.")
        else:
            lines.append(f"- Steps: {steps}.")
    val = rec["validation"]
    validation = ", ".join(f"{label} {_interval(val, key)}" for key, label in headline if key in val)
    lines.append(f"- Validation: {validation}.")
    lines.append(f"- Recipe chosen: {exp['chosen'] or 'not said'}.")
    if exp.get("details"):
        lines.append(f"- Details (candidates, earlier runs, curves): `{exp['details']}`.")
    return [*lines, f"- Published: {exp['published']}."]


def main(argv: list[str]) -> None:
    del argv
    args = flags.FLAGS
    render(Path(args.records), Path(args.output))
    print(f"Wrote {args.output} from {shown(args.records)} and {shown(CV)}.", flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
