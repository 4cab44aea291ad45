"""Stratified, grouped K-fold cross-validation of one recipe on everything but test: what recipes are
chosen on.

  python launch/cross_validate.py --config=configs/breastmnist.py --folds=5 \\
      --config.data.manual_dir=../shared/data/breastmnist

Fold k prepares the dataset with ``builder_kwargs.cv_folds=K, cv_fold=k`` (classification,
:mod:`medjax.data.splits`: train and validation pooled and re-split into K folds, stratified by class,
never separating one patient, exact or near duplicates; DRIVE, :mod:`medjax.data.builders.drive`: its 20
training images, one subject each, cut into K folds; test untouched either way) and trains the recipe
with fold k as validation and ``data.test_split=''``, so test is never evaluated. It reports each fold's
validation metrics of its best checkpoint, their mean and sample standard deviation, and writes them to
``--out`` (JSON and Markdown, default ``results/cv/<config name>.*``), with the recipe's digest and commit
(:mod:`medjax.protocol`), so ``launch/reproduce.py`` can put these numbers beside the test numbers of the
same recipe.

The K fold runs (``--workdir``, default ``runs/cv/<config name>/fold_<k>``) are also the fold ensemble:
``python -m medjax.evaluate --workdir=.../fold_0 ... --workdir=.../fold_<K-1> --splits=validation``
judges them as one model; on test only once the recipe is final, through ``launch/reproduce.py``.
A finished fold is read back, an interrupted one resumes from its checkpoint.
"""

import datetime
import fnmatch
import json
import statistics
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from medjax import cli  # No jax: --help stays fast.

ROOT = Path(__file__).resolve().parents[1]

# Validation metrics summarised, those of classification and of segmentation (a fold report holds one
# task's); a segmentation report's per-class pixel Dice (``pixel_dice_<class>``) follows mean Dice.
METRICS = (
    "auc", "accuracy", "balanced_accuracy", "f1", "mean_dice", "pixel_dice_*", "mean_iou", "pixel_auc",
    "pixel_accuracy", "sensitivity", "specificity", "loss",
)  # fmt: skip


def _define_flags() -> None:
    """Defined only when run as a program, so tests can import this module beside other commands' flags."""
    config_flags.DEFINE_config_file("config", None, "Recipe to cross-validate, e.g. configs/breastmnist.py.")
    flags.DEFINE_integer("folds", 5, "Number of folds K (each fold is validation once).")
    flags.DEFINE_string("workdir", None, "Root of the fold runs (default runs/cv/<config name>).")
    flags.DEFINE_string("out", None, "Summary path without suffix (default results/cv/<config name>).")
    flags.DEFINE_string("compilation_cache_dir", "~/.cache/medjax/jax", "Persistent XLA cache.")
    cli.define_allocator_flag()
    flags.mark_flags_as_required(["config"])


def fold_config(config, *, folds: int, fold: int):
    """``config`` with fold ``fold`` of ``folds`` as validation and test never evaluated."""
    fold_cfg = config.copy_and_resolve_references()
    with fold_cfg.unlocked():
        fold_cfg.data.builder_kwargs.cv_folds = folds
        fold_cfg.data.builder_kwargs.cv_fold = fold
    fold_cfg.data.test_split = ""
    return fold_cfg


def cross_validate(config, *, folds: int, workdir: Path) -> list[dict]:
    """Trains (or reads back) every fold; returns their training reports, fold 0 first."""
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    from medjax import train

    reports = []
    for fold in range(folds):
        print(f"== fold {fold} of {folds} -> {workdir / f'fold_{fold}'}", flush=True)
        fold_cfg = fold_config(config, folds=folds, fold=fold)
        reports.append(train.train_or_read_back(fold_cfg, workdir / f"fold_{fold}"))
    return reports


def summarize(reports: list[dict]) -> dict:
    """``{metric: {'mean', 'sd', 'folds': [...]}}`` over the folds' validation metrics (sample sd)."""
    out = {}
    present = list(reports[0]["validation"])
    for metric in (m for pattern in METRICS for m in present if fnmatch.fnmatchcase(m, pattern)):
        values = [float(r["validation"][metric]) for r in reports if metric in r["validation"]]
        if len(values) == len(reports):
            out[metric] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values), "folds": values}
    return out


def markdown(summary: dict, *, spec: str, digest: str, commit: str, workdir: Path, written: str) -> str:
    folds = len(next(iter(summary.values()))["folds"])
    lines = [
        f"# Cross-validation: `{spec}`",
        "",
        f"{folds} folds of train+validation, never splitting a patient (and stratified by class when "
        f"classifying); test never evaluated; recipe {digest} "
        f"(config at commit {commit}); fold runs in `{workdir}`; written {written}. Validation metrics of "
        "each fold's best checkpoint; mean ± sample standard deviation.",
        "",
        "| metric | mean ± sd | " + " | ".join(f"fold {k}" for k in range(folds)) + " |",
        "|---|---|" + "---|" * folds,
    ]
    for metric, s in summary.items():
        cells = " | ".join(f"{v:.3f}" for v in s["folds"])
        lines.append(f"| {metric} | {s['mean']:.3f} ± {s['sd']:.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    args = flags.FLAGS
    cli.setup(compilation_cache_dir=args.compilation_cache_dir, memory_allocator=args.allocator)
    from medjax import cores, protocol

    config = args["config"].value
    cores.limit(config.get("cpu_cores"))  # Before JAX starts.
    spec = args["config"].serialize().split("=", 1)[1]
    name = config.get("name", Path(spec.partition(":")[0]).stem)
    workdir = Path(args.workdir) if args.workdir else ROOT / "runs" / "cv" / name
    out = Path(args.out) if args.out else ROOT / "results" / "cv" / name
    config.train.progress_bar = False
    reports = cross_validate(config, folds=args.folds, workdir=workdir)
    summary = summarize(reports)
    digest = protocol.recipe_digest(config.to_dict())
    commit = protocol.last_commit(spec.partition(":")[0], repo=ROOT)
    written = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    record = {
        "config": spec,
        "overrides": [a for a in sys.argv[1:] if a.startswith("--config.")],
        "recipe": digest,
        "commit": commit,
        "written": written,
        "folds": args.folds,
        "workdirs": [str(workdir / f"fold_{k}") for k in range(args.folds)],
        "validation_examples": [r["validation"].get("num_examples") for r in reports],  # None: segmentation.
        "summary": summary,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(summary, spec=spec, digest=digest, commit=commit, workdir=workdir, written=written)
    out.with_suffix(".md").write_text(text)
    print(text + f"Wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}.", flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
