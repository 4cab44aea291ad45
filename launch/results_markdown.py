"""RESULTS.md from ``launch/reproduce.py``'s results: a table per task, each experiment's recipe and
published comparison, and the cross-validation of each recipe beside its test numbers.

Every row, whatever its task, ends with the same Recipe cell (:mod:`medjax.protocol`: the recipe's digest,
the last commit of its config, the date test was first evaluated for it and any earlier recipe whose test
was seen), and every experiment gets the same recipe section. What differs by task is the table's metric
columns: classification reports accuracy, AUC and F1 with the thresholds chosen on validation;
segmentation reports pooled pixel metrics inside the valid region (DRIVE's field of view), HD95 and,
where the test split has a second rater, that rater's row as the human level.
"""

import datetime
import os
import platform
from pathlib import Path

from medjax import allocator

ROOT = Path(__file__).resolve().parents[1]

# Per task, the metrics quoted side by side wherever one line sums a split up: the validation line of a
# recipe, an ensemble member alone, and the cross-validation table (keys of the task's validation
# metrics, which the evaluation report also holds for test, and how RESULTS.md names them).
HEADLINE = {
    "classification": (("accuracy", "accuracy"), ("auc", "AUC")),
    "segmentation": (("mean_dice", "mean Dice"), ("pixel_auc", "pixel AUC")),
}

_CLASSIFICATION_COLUMNS = (
    "Experiment", "Model", "Input", "Epochs", "Wall time", "Test accuracy", "Test AUC", "Test F1", "Sens.",
    "Spec.", "Params", "Size", "Target", "Recipe",
)  # fmt: skip
_SEGMENTATION_COLUMNS = (
    "Experiment", "Model", "Input", "Steps", "Wall time", "Test F1 (pixel Dice)", "Test pixel AUC",
    "Test accuracy", "Sens.", "Spec.", "HD95", "Params", "Size", "Target", "Recipe",
)  # fmt: skip


def shown(path: str | Path) -> str:
    """A path as the reader should type it from the repository root (relative when that is shorter)."""
    return os.path.relpath(path, ROOT) if Path(path).is_absolute() else str(path)


def task_of(config: dict) -> str:
    """A run config's task (runs from before medjax had tasks are classification)."""
    return config.get("task", "classification")


def _run_config(result: dict) -> dict:
    from medjax.run_dir import RunDir

    return RunDir(result["workdirs"][0]).read_config().to_dict()


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


def markdown(
    results: dict,
    *,
    skipped: dict,
    started: str,
    command: str,
    note: str | None,
    bootstrap_samples: int,
    shared: Path,
) -> str:
    """RESULTS.md: a table per task, the experiments not run, each experiment's recipe and comparison,
    and cross-validation beside test (``shared``: the data folder the recipes name)."""
    import jax

    configs = {name: _run_config(result) for name, result in results.items()}
    by_task = {
        task: {name: r for name, r in results.items() if task_of(configs[name]) == task} for task in HEADLINE
    }
    lines = [
        "# medjax results on real data",
        "",
        f"Written by `{command}` on {started} (UTC), finished "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; runs finished earlier are read back from "
        "their workdirs.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU; "
        f"jax {jax.__version__}. This invocation's memory allocator (medjax/allocator.py): "
        f"{allocator.describe()}; each wall time names the allocator of its own run. "
        "Every model is trained with a fixed seed (0, or one run per seed 0, 1, ... where the row is an "
        "ensemble, whose prediction is the mean of its runs' probabilities) from scratch, or, where its "
        "recipe says so, from the best checkpoint of an experiment above or from the ImageNet weights in "
        f"`{shown(shared.parent / 'weights')}`; test metrics are of the best-on-validation checkpoints, "
        f"with 95 % bootstrap intervals ({bootstrap_samples} resamples of the test set). Wall time is "
        "training (with its validations) on this machine, dataset preparation excluded, summed over an "
        "ensemble's runs.",
        "",
        "Test protocol (medjax/protocol.py): training never evaluates test; this command evaluates it once "
        "per recipe and records it in `results/test_ledger.json`. The Recipe column gives the recipe's "
        "digest, the last commit of its config file and the date test was first evaluated for it, and says "
        "when test had been evaluated for earlier recipes of the row (peeking). Each recipe section says "
        "how the recipe was chosen; the closing section puts its cross-validation beside its test numbers.",
        *([f"Note: {note}"] if note else []),
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
            *(_classification_row(n, r, configs[n]) for n, r in by_task["classification"].items()),
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
            *[
                row
                for n, r in by_task["segmentation"].items()
                for row in _segmentation_rows(n, r, configs[n])
            ],
        ]
    if skipped:
        lines += ["", "## Not run", "", *(f"- {name}: {reason}." for name, reason in skipped.items())]
    lines += ["", "## Recipes and published comparisons", ""]
    for name, result in results.items():
        lines += [f"### {name}", *_recipe_lines(result, configs[name], shared=shared), ""]
    return "\n".join([*lines, *cv_lines(results, {n: task_of(c) for n, c in configs.items()})]) + "\n"


def _header(columns: tuple[str, ...]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _common_cells(result: dict, config: dict) -> tuple[str, str]:
    """The Model and Wall time cells, alike for every task."""
    train_reports, exp = result["train"], result["experiment"]
    runs = len(train_reports)
    model = config["model_name"] + (f", ensemble of {runs}" if runs > 1 else "")
    minutes = sum(r["wall_time_s"] for r in train_reports) / 60
    budget = exp["budget_s"]
    # Runs from before medjax chose allocators ran under glibc's defaults.
    memory = sorted({r.get("allocator", "system").replace("system", "glibc") for r in train_reports})
    wall = f"{minutes:.1f} min, {' and '.join(memory)}" + (
        f" ({'≤' if minutes * 60 <= budget else '>'} {budget / 60:.0f})" if budget else ""
    )
    return model, wall


def _size_cells(evaluation: dict) -> str:
    card = evaluation["model_card"]["profile"]
    return f"{card['params'] / 1e6:.2f} M | {card['params_mb']:.1f} MB"


def _classification_row(name: str, result: dict, config: dict) -> str:
    train_reports, evaluation, exp = result["train"], result["evaluation"], result["experiment"]
    test = evaluation["splits"]["test"]["metrics"]
    youden = evaluation["thresholds"]["rules"]["youden"]["test"]
    steps_per_epoch = train_reports[0]["total_steps"] / config["train"]["num_epochs"]
    epochs = ", ".join(f"{r['steps'] / steps_per_epoch:.0f}" for r in train_reports)
    epochs += f"/{config['train']['num_epochs']:.0f}"
    model, wall = _common_cells(result, config)
    size = config["data"]["image_size"]
    return (
        f"| {name} | {model} | {size}x{size}x{config['data']['channels']} "
        f"| {epochs} | {wall} | {_interval(test, 'accuracy')} | {_interval(test, 'auc')} "
        f"| {_interval(test, 'f1')} | {youden['sensitivity']:.3f} | {youden['specificity']:.3f} "
        f"| {_size_cells(evaluation)} | {target_text(exp, test)} | {protocol_text(result)} |"
    )


def f1_key(class_names: list[str]) -> str:
    """The segmentation F1 of RESULTS.md: the foreground's pooled pixel Dice (binary), else the mean
    Dice over classes and images."""
    return f"pixel_dice_{class_names[1]}" if len(class_names) == 2 else "mean_dice"


def _segmentation_rows(name: str, result: dict, config: dict) -> list[str]:
    """The experiment's row, then one per other rater of the test split (the human level)."""
    train_reports, evaluation, exp = result["train"], result["evaluation"], result["experiment"]
    split = evaluation["splits"]["test"]
    test = split["metrics"]
    f1 = f1_key(evaluation["class_names"])
    steps = ", ".join(str(r["steps"]) for r in train_reports) + f"/{train_reports[0]['total_steps']}"
    model, wall = _common_cells(result, config)
    data = config["data"]
    side = data.get("patch_size") or data["image_size"]
    size = f"{side}x{side}x{data['channels']}"
    if data.get("patch_size"):
        size += " patches, whole images at evaluation"
    unit = "px" if split["distance_unit"] == "pixels" else split["distance_unit"]

    def point(values: dict, key: str) -> str:
        value = values.get(key)
        value = value["value"] if isinstance(value, dict) else value
        return "-" if value is None else f"{value:.3f}"

    auc = _interval(test, "pixel_auc") if "pixel_auc" in test else "-"
    rows = [
        f"| {name} | {model} | {size} | {steps} | {wall} | {_interval(test, f1)} | {auc} "
        f"| {_interval(test, 'pixel_accuracy')} | {point(test, 'sensitivity')} "
        f"| {point(test, 'specificity')} "
        f"| {test['mean_hd95']['value']:.2f} {unit} | {_size_cells(evaluation)} | {target_text(exp, test)} "
        f"| {protocol_text(result)} |"
    ]
    for rater, values in split.get("human", {}).items():
        rows.append(
            f"| {name}: {rater.replace('_', ' ')} vs the reference | human | | | | {point(values, f1)} | - "
            f"| {point(values, 'pixel_accuracy')} | {point(values, 'sensitivity')} "
            f"| {point(values, 'specificity')} | - | | | | |"
        )
    return rows


def protocol_text(result: dict) -> str:
    """The Recipe cell: digest @ commit, first test date, and any test seen for earlier recipes."""
    history = result.get("protocol", {}).get("history")
    if not history:
        return "not recorded"
    entry = history[-1]
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


def cv_lines(results: dict, tasks: dict) -> list[str]:
    """Closing section: each recipe's cross-validation (mean ± sd over folds) beside its test numbers
    (``tasks``: each experiment's task)."""
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
    for name, result in results.items():
        task = tasks[name]
        tested = _summary(result["evaluation"]["splits"]["test"]["metrics"], task, cv=False)
        cv = result.get("protocol", {}).get("cv")
        if not cv:
            lines.append(f"| {name} | none yet | | {tested} | |")
            continue
        same = "yes" if cv["recipe"] == result["protocol"]["cv_recipe"] else f"no (CV of {cv['recipe']})"
        crossed = _summary(cv["summary"], task, cv=True)
        lines.append(f"| {name} | {crossed} | {cv['folds']} | {tested} | {same} |")
    return lines


def _recipe_lines(result: dict, config: dict, *, shared: Path) -> list[str]:
    """One experiment's config, runs, validation numbers and published comparison."""
    exp, train_reports = result["experiment"], result["train"]
    headline = HEADLINE[task_of(config)]
    workdirs = [Path(w) for w in result["workdirs"]]
    ensemble = len(workdirs) > 1
    folder = shown(workdirs[0].parent if ensemble else workdirs[0])
    data = shown(shared / exp["data"])
    line = f"- Config: `{exp['config']}` with `--config.data.manual_dir={data}`"
    if ensemble:
        line += (
            f"; an ensemble of {len(workdirs)} runs, `--config.seed=<k>` for k in "
            f"{', '.join(map(str, exp['seeds']))} in workdirs `{folder}/seed_<k>`, evaluated together by "
            f"`python -m medjax.evaluate --workdir=... --workdir=... --out={folder}/evaluation`"
        )
    else:
        line += f"; workdir `{folder}`"
    lines = [line + f" (`{folder}/evaluation/report.md` has the figures and every number of the evaluation)."]
    start = (config.get("init_from") or {}).get("path")
    if exp["init_from"]:
        lines.append(
            f"- Initialised from the best checkpoint of `{exp['init_from']}` (above), output layer "
            "re-initialised; that run's training time is not in this wall time."
        )
    elif start:
        fresh = ", output layer re-initialised" if config["init_from"].get("reinit_head") else ""
        lines.append(f"- Initialised from `{shown(start)}`{fresh}.")
    for seed, r in zip(exp["seeds"], train_reports, strict=True):
        steps = (
            f"{r['steps']} of {r['total_steps']} (early stopping: {r['stopped_early']}), best checkpoint at "
            f"step {r['best_step']}"
        )
        if ensemble:
            val = r["validation"]
            alone = ", ".join(f"{label} {val[key]:.3f}" for key, label in headline if key in val)
            lines.append(f"- Seed {seed}: {steps}; alone, validation {alone}.")
        else:
            lines.append(f"- Steps: {steps}.")
    val = result["evaluation"]["splits"]["validation"]["metrics"]
    validation = ", ".join(f"{label} {_interval(val, key)}" for key, label in headline if key in val)
    lines.append(f"- Validation: {validation}.")
    lines.append(f"- Recipe chosen: {exp['chosen'] or 'not said'}.")
    if exp.get("details"):
        lines.append(f"- Details (candidates, earlier runs, curves): `{exp['details']}`.")
    return [*lines, f"- Published: {exp['published']}."]
