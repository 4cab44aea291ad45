"""Reproduces the studies on the real datasets in ``../shared/data`` and writes ``RESULTS.md``.

One command trains every experiment below from scratch with a fixed seed, evaluates each best-on-validation
checkpoint with ``medjax.evaluate`` (95 % bootstrap intervals, thresholds, calibration, model card) and
writes the table::

  JAX_PLATFORMS=cpu python launch/reproduce.py            # all experiments -> RESULTS.md
  JAX_PLATFORMS=cpu python launch/reproduce.py --only=pneumoniamnist,breastmnist

Every run's workdir is kept under ``--workdir_root`` (default ``runs/reproduce``): a finished run is read
back instead of retrained, an interrupted one resumes from its checkpoint, so rerunning the command after a
kill continues (an evaluation already written with the same ``--bootstrap_samples`` is reused too; delete
a run's directory to redo it). Datasets are prepared (TFDS manual-download convention, read in place from
``--shared_data``) before the clock of each run starts, so "train time" is training plus evaluation only.
An experiment whose data is absent is listed as skipped, with the path it looked for.
"""

import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # The repository, for medjax.
from medjax import allocator, cli  # noqa: E402  (no jax: --help stays fast)

_SHARED = flags.DEFINE_string(
    "shared_data",
    os.environ.get("MEDJAX_SHARED_DATA", str(ROOT.parent / "shared" / "data")),
    "Folder holding pneumoniamnist/, breastmnist/ and chest_xray/ as laid out in its README.",
)
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", str(ROOT / "runs" / "reproduce"), "Run directories.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir for the prepared datasets (default TFDS').")
_OUTPUT = flags.DEFINE_string("output", str(ROOT / "RESULTS.md"), "Markdown results table.")
_ONLY = flags.DEFINE_list("only", None, "Experiment names to run (default: all).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap_samples", 1000, "Resamples behind each 95 % interval.")
_CACHE_DIR = flags.DEFINE_string("compilation_cache_dir", "~/.cache/medjax/jax", "Persistent XLA cache.")
_ALLOCATOR = cli.define_allocator_flag()
_NOTE = flags.DEFINE_string("note", None, "A sentence for RESULTS.md, e.g. what else loaded the machine.")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One row of RESULTS.md: a config, the shared-data folder it reads, and what to compare it with."""

    name: str
    config: str
    data: str  # Folder under --shared_data, given to the config as data.manual_dir.
    published: str
    targets: dict  # Metric -> the target on test (AUC, accuracy), shown as met or not.
    budget_s: float | None = None  # Wall-time target of training + evaluation, when the issue sets one.
    init_from: str | None = None  # An experiment above whose best checkpoint this one fine-tunes.


EXPERIMENTS = (
    Experiment(
        "pneumoniamnist",
        "configs/pneumoniamnist.py",
        "pneumoniamnist",
        "MedMNIST v2 test ACC/AUC: ResNet-18 (28) 0.854/0.944, ResNet-50 (224) 0.884/0.962, "
        "Google AutoML Vision 0.946/0.991",
        {"auc": 0.97, "accuracy": 0.92},
        budget_s=600.0,
    ),
    *(
        Experiment(
            f"chest_xray_{family}",
            f"configs/chest_xray.py:variant=cpu,model={family}",
            "chest_xray",
            "Study C (MobileNetV2, ImageNet-pretrained, 224x224): validation ACC 0.912, AUC 0.947",
            {"auc": 0.95},
        )
        for family in ("mobilenet_v2", "convnext", "mednext_plos")
    ),
    Experiment(
        "breastmnist",
        "configs/breastmnist.py:from_pneumoniamnist",
        "breastmnist",
        "MedMNIST v2 test ACC/AUC: ResNet-18 (28) 0.863/0.901, Google AutoML Vision 0.861/0.919. "
        "Label 1 is normal/benign here, so Sens. is the benign recall and Spec. the malignant recall",
        {"auc": 0.92},
        init_from="pneumoniamnist",
    ),
)


def run_experiment(exp: Experiment, *, shared: Path, workdir: Path, data_dir: str | None) -> dict | None:
    """Trains (or reads back) and evaluates one experiment; None when its data is absent."""
    from medjax import config_lib, evaluate, train
    from medjax.data import pipeline

    data_path = shared / exp.data
    if not data_path.exists():
        return None
    config = config_lib.load_config_file(str(ROOT / exp.config))
    config.data.manual_dir = str(data_path)
    config.data.data_dir = data_dir
    config.train.progress_bar = False
    if exp.init_from:  # Wherever --workdir_root put the run it fine-tunes.
        config.init_from.path = str(workdir.parent / exp.init_from)
    report_path = workdir / "report.json"
    if report_path.exists():
        saved = json.loads((workdir / "config.json").read_text())
        differing = config_lib.differing_keys(saved, config.to_dict())
        if differing:  # A finished run of an older recipe must not be reported as the current one.
            raise SystemExit(
                f"{workdir} holds a finished run of another config (keys {differing}); delete it to rerun."
            )
        train_report = json.loads(report_path.read_text())
    else:
        pipeline.dataset_metadata(config.data)  # Prepares the dataset outside the timed run.
        print(f"== {exp.name}: {exp.config} -> {workdir}", flush=True)
        train_report = train.train_and_evaluate(config, workdir)
    evaluation_path = workdir / "evaluation" / "report.json"
    evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.exists() else None
    if evaluation is None or evaluation["settings"]["bootstrap_samples"] != _BOOTSTRAP.value:
        evaluation = evaluate.evaluate_run(
            workdir, data_dir=data_dir, splits=("validation", "test"), bootstrap_samples=_BOOTSTRAP.value
        )
    return {"experiment": dataclasses.asdict(exp), "train": train_report, "evaluation": evaluation}


def _shown(path: str | Path) -> str:
    """A path as the reader should type it from the repository root (relative when that is shorter)."""
    return os.path.relpath(path, ROOT) if Path(path).is_absolute() else str(path)


def _interval(metrics: dict, key: str) -> str:
    entry = metrics[key]
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _target_text(exp: dict, test: dict) -> str:
    parts = []
    for key, target in exp["targets"].items():
        value = test[key]["value"]
        digits = 3  # More where rounding would hide the comparison (0.9199 < 0.92, not 0.920 < 0.92).
        while round(value, digits) == target and digits < 6:
            digits += 1
        met = value >= target
        parts.append(f"{key} {value:.{digits}f} {'≥' if met else '<'} {target} {'✓' if met else '✗'}")
    return "; ".join(parts)


def markdown(results: dict, *, skipped: dict, started: str, command: str, note: str | None) -> str:
    """RESULTS.md: the table, then each experiment's recipe and comparison."""
    import jax

    lines = [
        "# medjax results on real data",
        "",
        f"Written by `{command}` on {started} (UTC), finished "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; runs finished earlier are read back from "
        "their workdirs.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU; "
        f"jax {jax.__version__}. This invocation ran under the {allocator.active()} memory allocator "
        "(medjax/allocator.py); each wall time names the allocator of its own run. "
        "Every model is trained with seed 0 from scratch, or, where its recipe says so, from the best "
        "checkpoint of an experiment above (no downloaded weights); "
        "test metrics are of the best-on-validation checkpoint, with 95 % bootstrap intervals "
        f"({_BOOTSTRAP.value} stratified resamples of the test set). Sensitivity and specificity are at the "
        "threshold chosen on validation (Youden's J), applied unchanged to test; accuracy, F1 and the "
        "confusion counts use the argmax. Wall time is training plus evaluation on this machine (dataset "
        "preparation excluded).",
        *([f"Note: {note}"] if note else []),
        "",
        "| Experiment | Model | Input | Epochs | Wall time | Test accuracy | Test AUC | Test F1 | Sens. "
        "| Spec. | Params | Size | Target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        train_report, evaluation, exp = result["train"], result["evaluation"], result["experiment"]
        config = json.loads((Path(evaluation["workdir"]) / "config.json").read_text())
        test = evaluation["splits"]["test"]["metrics"]
        youden = evaluation["thresholds"]["rules"]["youden"]["test"]
        card = evaluation["model_card"]["profile"]
        steps_per_epoch = train_report["total_steps"] / config["train"]["num_epochs"]
        epochs = f"{train_report['steps'] / steps_per_epoch:.0f}/{config['train']['num_epochs']:.0f}"
        minutes = train_report["wall_time_s"] / 60
        budget = exp["budget_s"]
        # Runs from before medjax chose allocators ran under glibc's defaults.
        memory = train_report.get("allocator", "system").replace("system", "glibc")
        wall = f"{minutes:.1f} min, {memory}" + (
            f" ({'≤' if minutes * 60 <= budget else '>'} {budget / 60:.0f})" if budget else ""
        )
        size = config["data"]["image_size"]
        lines.append(
            f"| {name} | {config['model_name']} | {size}x{size}x{config['data']['channels']} "
            f"| {epochs} | {wall} | {_interval(test, 'accuracy')} | {_interval(test, 'auc')} "
            f"| {_interval(test, 'f1')} | {youden['sensitivity']:.3f} | {youden['specificity']:.3f} "
            f"| {card['params'] / 1e6:.2f} M | {card['params_mb']:.1f} MB | {_target_text(exp, test)} |"
        )
    for name, reason in skipped.items():
        lines.append(f"| {name} | skipped: {reason} | | | | | | | | | | | |")
    lines += ["", "## Recipes and published comparisons", ""]
    for name, result in results.items():
        exp, train_report = result["experiment"], result["train"]
        val = result["evaluation"]["splits"]["validation"]["metrics"]
        lines += [
            f"### {name}",
            f"- Config: `{exp['config']}` with "
            f"`--config.data.manual_dir={_shown(Path(_SHARED.value) / exp['data'])}`; workdir "
            f"`{_shown(result['evaluation']['workdir'])}` (its `evaluation/report.md` has the ROC, "
            "calibration and confusion pictures).",
            *(
                [
                    f"- Initialised from the best checkpoint of `{exp['init_from']}` (above), output layer "
                    "re-initialised; that run's training time is not in this wall time."
                ]
                * bool(exp["init_from"])
            ),
            f"- Steps: {train_report['steps']} of {train_report['total_steps']} (early stopping: "
            f"{train_report['stopped_early']}), best checkpoint at step {train_report['best_step']}.",
            f"- Validation: accuracy {_interval(val, 'accuracy')}, AUC {_interval(val, 'auc')}.",
            f"- Published: {exp['published']}.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    cli.setup(compilation_cache_dir=_CACHE_DIR.value, memory_allocator=_ALLOCATOR.value)
    started = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}"
    chosen = [e for e in EXPERIMENTS if not _ONLY.value or e.name in _ONLY.value]
    unknown = set(_ONLY.value or ()) - {e.name for e in EXPERIMENTS}
    if unknown:
        sys.exit(f"Unknown experiments {sorted(unknown)}; known: {', '.join(e.name for e in EXPERIMENTS)}.")
    shared, root = Path(_SHARED.value), Path(_WORKDIR_ROOT.value)
    results, skipped = {}, {}
    for exp in chosen:
        t0 = time.perf_counter()
        if exp.init_from and not (root / exp.init_from / "report.json").exists():
            skipped[exp.name] = f"starts from the `{exp.init_from}` run, which has not finished"
            print(f"== {exp.name}: skipped, {skipped[exp.name]}", flush=True)
            continue
        result = run_experiment(exp, shared=shared, workdir=root / exp.name, data_dir=_DATA_DIR.value)
        if result is None:
            skipped[exp.name] = f"no data at `{_shown(shared / exp.data)}`"
            print(f"== {exp.name}: skipped, no data at {shared / exp.data}", flush=True)
            continue
        results[exp.name] = result
        print(f"== {exp.name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    command = "python launch/reproduce.py" + (f" --only={','.join(_ONLY.value)}" if _ONLY.value else "")
    Path(_OUTPUT.value).write_text(
        markdown(results, skipped=skipped, started=started, command=command, note=_NOTE.value)
    )
    (root / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"Wrote {_OUTPUT.value} and {root / 'results.json'}.", flush=True)


if __name__ == "__main__":
    app.run(main)
