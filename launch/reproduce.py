"""Reproduces the studies on the real datasets in ``../shared/data`` and writes ``RESULTS.md``.

One command trains every experiment below (classification and segmentation alike) with a fixed seed,
evaluates each best-on-validation checkpoint with ``medjax.evaluate`` (95 % bootstrap intervals; for
classification thresholds, calibration; for segmentation per-image Dice, HD95 and the human level; a model
card), keeps what RESULTS.md says of each experiment in a record, ``results/reproduce/<experiment>.json``
(``--records``; committed, unlike the runs), and renders RESULTS.md from the records
(``launch/results_markdown.py``: one table per task, every row with the same Recipe column). With
``--only``, the other experiments' rows are their records as they stand; ``python
launch/results_markdown.py`` renders RESULTS.md again without running anything, e.g. after a
cross-validation.

The locked test protocol (:mod:`medjax.protocol`): training never evaluates test (``data.test_split=''``);
this script evaluates it once per final recipe and records it in ``results/test_ledger.json`` (the
recipe's digest, the commit of its config, the date test was first evaluated). A recipe changed after its
test was seen is refused (``--allow_recipe_change`` evaluates it anyway and RESULTS.md says so). Each row
says how its recipe was chosen, and the closing section puts the recipe's cross-validation numbers
(``launch/cross_validate.py --out=results/cv/<experiment>``, read when rendering) beside its test numbers::

  JAX_PLATFORMS=cpu python launch/reproduce.py            # all experiments -> RESULTS.md
  JAX_PLATFORMS=cpu python launch/reproduce.py --only=pneumoniamnist,breastmnist

Every run's workdir is kept under ``--workdir_root`` (default ``runs/reproduce``): a finished run is read
back instead of retrained, an interrupted one resumes from its checkpoint, so rerunning the command after a
kill continues (an evaluation already written with the same ``--bootstrap_samples`` is reused too; delete
a run's directory to redo it). Datasets are prepared (TFDS manual-download convention, read in place from
``--shared_data``) before the clock of each run starts, so "train time" is training plus evaluation only.
An experiment whose data is absent is listed as not run, with the path it looked for.
"""

import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import results_markdown  # launch/results_markdown.py, beside this script.
from absl import app, flags

from medjax import cli  # No jax: --help stays fast.

ROOT = Path(__file__).resolve().parents[1]


def _define_flags() -> None:
    """Defined only when run as a program, so tests can import this module beside other commands' flags."""
    flags.DEFINE_string(
        "shared_data",
        os.environ.get("MEDJAX_SHARED_DATA", str(ROOT.parent / "shared" / "data")),
        "Folder holding pneumoniamnist/, breastmnist/, chest_xray/, ucsd_covid_ct/ and drive/ as laid out in "
        "its README.",
    )
    flags.DEFINE_string("workdir_root", str(ROOT / "runs" / "reproduce"), "Run directories.")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir for the prepared datasets (default TFDS').")
    flags.DEFINE_string("output", str(ROOT / "RESULTS.md"), "Markdown results table.")
    flags.DEFINE_string(
        "records", str(results_markdown.RECORDS), "Records RESULTS.md is rendered from (results_markdown.py)."
    )
    flags.DEFINE_list("only", None, "Experiment names to run (default: all).")
    flags.DEFINE_integer("bootstrap_samples", 1000, "Resamples behind each 95 % interval.")
    flags.DEFINE_string("compilation_cache_dir", "~/.cache/medjax/jax", "Persistent XLA cache.")
    cli.define_allocator_flag()
    flags.DEFINE_string("note", None, "A sentence for RESULTS.md, e.g. what else loaded the machine.")
    flags.DEFINE_string("ledger", str(ROOT / "results" / "test_ledger.json"), "Test evaluations so far.")
    flags.DEFINE_bool(
        "allow_recipe_change", False, "Evaluate test for a recipe changed since its test was evaluated."
    )


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One row of RESULTS.md: a config, the shared-data folder it reads, and what to compare it with."""

    name: str
    config: str
    data: str  # Folder under --shared_data, given to the config as data.manual_dir.
    published: str
    targets: dict  # Test metric (a key of the evaluation report) -> the target, shown as met or not.
    budget_s: float | None = None  # Wall-time target of training + evaluation, when the issue sets one.
    init_from: str | None = None  # An experiment above whose best checkpoint this one fine-tunes.
    seeds: tuple[int, ...] = (0,)  # Several: an ensemble of one run per seed (mean class probabilities).
    chosen: str = ""  # How the recipe was chosen (RESULTS.md quotes it on the row's recipe).
    details: str = ""  # A file of results/ on how the recipe came about (candidates, hand-made runs).

    def workdirs(self, root: Path) -> list[Path]:
        """One run directory per seed: ``<root>/<name>``, or ``<root>/<name>/seed_<k>`` in an ensemble.
        The evaluation is ``<root>/<name>/evaluation`` either way."""
        if len(self.seeds) == 1:
            return [root / self.name]
        return [root / self.name / f"seed_{seed}" for seed in self.seeds]


# Recipes settled before the locked protocol: variants were compared on test numbers too.
_BEFORE_PROTOCOL = (
    "before the locked test protocol, comparing variants on test as well as validation (seed 0), so its "
    "test numbers are optimistic; not yet re-chosen by cross-validation"
)
EXPERIMENTS = (
    Experiment(
        "pneumoniamnist",
        "configs/pneumoniamnist.py",
        "pneumoniamnist",
        "MedMNIST v2, same official split and metrics (test ACC/AUC): ResNet-18 (28) 0.854/0.944, "
        "ResNet-50 (224) 0.884/0.962, Google AutoML Vision 0.946/0.991",
        {"auc": 0.97, "accuracy": 0.92},
        budget_s=600.0,
        chosen=_BEFORE_PROTOCOL,
    ),
    *(
        Experiment(
            f"chest_xray_{family}",
            f"configs/chest_xray.py:variant=scratch,model={family}",
            "chest_xray",
            "Study C (MobileNetV2, ImageNet-pretrained, 224x224): validation ACC 0.912, AUC 0.947 on its own "
            "80/20 per-image carve of train. Not like for like: this row is the official test split, at "
            "64x64 grey, from scratch, validated on a carve by patient",
            {"auc": 0.95},
            chosen=_BEFORE_PROTOCOL,
        )
        for family in ("mobilenet_v2", "convnext", "mednext_plos")
    ),
    Experiment(
        "chest_xray_imagenet",
        "configs/chest_xray.py:cpu",
        "chest_xray",
        "Study C (MobileNetV2, ImageNet-pretrained, 224x224): validation ACC 0.912, AUC 0.947 on its own "
        "80/20 per-image carve of train. Not like for like: this row is the official test split (another "
        "cohort), validated on a carve by patient, after 5 epochs rather than study C's",
        {"auc": 0.96, "accuracy": 0.90},
        budget_s=1800.0,
        chosen="fixed before any run: study C's recipe (medjax/recipes.py), its length set by the 30-minute "
        "budget of the cpu variant; the checkpoint is chosen on validation loss; no variant was compared",
        details="results/chest_xray_imagenet.md",
    ),
    Experiment(
        "chest_xray_imagenet_full",
        "configs/chest_xray.py",
        "chest_xray",
        "Study C (MobileNetV2, ImageNet-pretrained, 224x224): validation ACC 0.912, AUC 0.947 on its own "
        "80/20 per-image carve of train. Not like for like: this row is the official test split (another "
        "cohort), validated on a carve by patient",
        {"auc": 0.96, "accuracy": 0.90},
        chosen="fixed before any run: study C's full recipe, the config's default (medjax/recipes.py: 15 "
        "epochs, the classifier alone for 2, the last blocks for 2, then all); the checkpoint is chosen on "
        "validation loss; no variant was compared. Its test was evaluated after the 5-epoch cpu variant's",
        details="results/chest_xray_imagenet.md",
    ),
    Experiment(
        "chest_xray_imagenet_cohort",
        "configs/chest_xray.py:cohort",
        "chest_xray",
        "Study C (MobileNetV2, ImageNet-pretrained, 224x224): validation ACC 0.912, AUC 0.947 on its own "
        "80/20 per-image carve of train. Not like for like: this row is the official test split (another "
        "cohort), validated on a carve by patient, with crops, intensity jitter and a balanced loss",
        {"auc": 0.96, "accuracy": 0.90},
        chosen="after test had been seen for study C's recipe (rows chest_xray_imagenet and _full): the next "
        "recipe results/chest_xray_imagenet.md named then (crops, intensity jitter, a balanced loss), plus "
        "Adam at 1e-4 because the all-layer epochs at 8e-4 made validation loss jump; run once, not tuned",
        details="results/chest_xray_imagenet.md",
    ),
    Experiment(
        "breastmnist",
        "configs/breastmnist.py:from_pneumoniamnist",
        "breastmnist",
        "MedMNIST v2, same official split and metrics (test ACC/AUC): ResNet-18 (28) 0.863/0.901, Google "
        "AutoML Vision 0.861/0.919. Label 1 is normal/benign here, so Sens. is the benign recall and Spec. "
        "the malignant recall. The official splits share 99 near-duplicate pairs (preparation report), "
        "which flatters every result on this split, published ones included",
        {"auc": 0.92},
        init_from="pneumoniamnist",
        seeds=(0, 1, 2, 3, 4),
        chosen=_BEFORE_PROTOCOL.replace("(seed 0)", "(configs/breastmnist.py cites the validation numbers)"),
    ),
    Experiment(
        "ucsd_covid_ct",
        "configs/ucsd_covid_ct.py:cpu",
        "ucsd_covid_ct",
        "He et al. 2020 (Self-Trans: DenseNet-169, ImageNet transfer and self-supervision), same official "
        "split (test): F1 0.85 (of the COVID class; F1 here is the macro mean), AUC 0.94, accuracy about "
        "0.86. Not like for like in model and input: MobileNetV2 at 160 px",
        {"auc": 0.94},
        budget_s=1800.0,
        chosen="on validation (results/ucsd_covid_ct.md): four candidates at 160 and 224 px, validation AUC "
        "0.54-0.835; this one, full fine-tuning at 1e-4 in [-1, 1] at 160 px, was the highest",
        details="results/ucsd_covid_ct.md",
    ),
    Experiment(
        "drive",
        "configs/drive.py",
        "drive",
        "Same official test split and metric (pixels inside the FOV against the 1st observer): U-Net F1 "
        "about 0.81-0.82, AUC 0.975-0.98; SA-UNet (Guo et al. 2020) F1 0.826, AUC 0.986; the 2nd observer "
        "F1 0.788, accuracy 0.947 (the human row, measured by this code). Not like for like in size: this "
        "U-Net is 1/64 of the original's width (0.48 M against 31 M parameters)",
        {"pixel_dice_vessel": 0.80, "pixel_auc": 0.97},
        budget_s=1200.0,
        chosen="fixed before any run from common DRIVE practice (patches, flips, rotation, CE + Dice); the "
        "only choice made on data is the checkpoint, the best validation mean Dice (4 of the 20 training "
        "images, seeded) of the evaluations every 100 steps",
        details="results/segmentation_drive.md",
    ),
)


def run_experiment(
    exp: Experiment,
    *,
    shared: Path,
    root: Path,
    data_dir: str | None,
    bootstrap_samples: int,
    ledger,
    allow_recipe_change: bool = False,
) -> dict | None:
    """Trains (or reads back) every run of one experiment and evaluates it; None when its data is absent.

    Training never evaluates test; the evaluation here does, once per recipe, recorded in ``ledger`` (a
    :class:`medjax.protocol.TestLedger`).

    Raises:
      medjax.protocol.RecipeChangedError: test was evaluated for another recipe of this experiment and
        ``allow_recipe_change`` is False (nothing is evaluated).
    """
    from medjax import protocol, train
    from medjax.evaluate import command as evaluate
    from medjax.run_dir import RunDir, report_paths

    if not (shared / exp.data).exists():
        return None
    config = experiment_config(exp, shared=shared, root=root, data_dir=data_dir)
    keys = recipe_keys(exp, config)
    ledger.ensure_allowed(exp.name, keys, allow_change=allow_recipe_change)  # Before hours of training.
    workdirs = exp.workdirs(root)
    train_reports = []
    for seed, workdir in zip(exp.seeds, workdirs, strict=True):
        config.seed = seed
        announce = f"== {exp.name}: {exp.config} (seed {seed}) -> {workdir}"
        train_reports.append(train.train_or_read_back(config, workdir, announce=announce))
    out = RunDir(root / exp.name).evaluation_dir
    evaluation = reusable_evaluation(report_paths(out)[0], workdirs, bootstrap_samples=bootstrap_samples)
    if evaluation is None:
        evaluation = evaluate.evaluate_run(
            workdirs,
            out=out,
            data_dir=data_dir,
            splits=("validation", "test"),
            bootstrap_samples=bootstrap_samples,
        )
        commit = protocol.last_commit(exp.config.partition(":")[0], repo=ROOT)
        ledger.record(exp.name, keys=keys, commit=commit, allow_change=allow_recipe_change)
    return {
        "experiment": dataclasses.asdict(exp),
        "workdirs": [str(w) for w in workdirs],
        "train": train_reports,
        "evaluation": evaluation,
        "protocol": {
            "recipe": protocol.digest(keys),
            "cv_recipe": protocol.recipe_digest(config.to_dict()),  # As launch/cross_validate.py names it.
            "history": ledger.history(exp.name),
        },
    }


def experiment_config(exp: Experiment, *, shared: Path, root: Path, data_dir: str | None):
    """The config every run of ``exp`` trains with: its config file reading ``<shared>/<exp.data>`` in
    place, test never evaluated by training, and its starting weights where this invocation keeps them."""
    from medjax import config_lib, recipes

    config = config_lib.load_config_file(str(ROOT / exp.config))
    config.data.manual_dir = str(shared / exp.data)
    config.data.data_dir = data_dir
    config.data.test_split = ""  # Test is this script's to evaluate, once (medjax.protocol).
    config.train.progress_bar = False
    if exp.init_from:  # Wherever --workdir_root put the run it fine-tunes.
        config.init_from.path = str(_source_run(exp, root))
    elif config.init_from.path == recipes.IMAGENET_MOBILENET_V2:  # The ImageNet start, read in place.
        config.init_from.path = str(shared.parent / "weights" / recipes.IMAGENET_MOBILENET_V2_FILE)
    return config


def recipe_keys(exp: Experiment, config) -> dict:
    """The flat recipe the test ledger records for ``exp`` (:func:`medjax.protocol.recipe`): its config's,
    with the experiment's seeds and the experiment it fine-tunes."""
    from medjax import protocol

    return protocol.recipe(config.to_dict(), seeds=list(exp.seeds), init_from=exp.init_from)


def _cannot_run(exp: Experiment, root: Path) -> str | None:
    """Why ``exp`` cannot run now (None when it can; absent data is found by run_experiment)."""
    from medjax.run_dir import RunDir

    config_file = exp.config.partition(":")[0]
    if not (ROOT / config_file).exists():
        return f"no config yet (`{config_file}`)"
    if exp.init_from and RunDir(_source_run(exp, root)).read_report() is None:
        return f"starts from the `{exp.init_from}` run, which has not finished"
    return None


def reusable_evaluation(path: Path, workdirs: list[Path], *, bootstrap_samples: int) -> dict | None:
    """The evaluation report at ``path`` if it is of these runs as they are now, with this invocation's
    resamples; None when it must be redone (absent, of other or since retrained runs, from before reports
    named their members, or with another ``--bootstrap_samples``)."""
    from medjax.run_dir import RunDir

    finished = max(RunDir(w).report_file.stat().st_mtime for w in workdirs)
    if not path.exists() or path.stat().st_mtime < finished:
        return None
    evaluation = json.loads(path.read_text())
    same_runs = [m["workdir"] for m in evaluation.get("members", [])] == [str(w) for w in workdirs]
    if not same_runs or evaluation["settings"]["bootstrap_samples"] != bootstrap_samples:
        return None
    return evaluation


def _source_run(exp: Experiment, root: Path) -> Path:
    """The run ``exp`` fine-tunes: the first run of its ``init_from`` experiment."""
    return next(e for e in EXPERIMENTS if e.name == exp.init_from).workdirs(root)[0]


def main(argv: list[str]) -> None:
    del argv
    args = flags.FLAGS
    cli.setup(compilation_cache_dir=args.compilation_cache_dir, memory_allocator=args.allocator)
    from medjax import protocol  # After the allocator re-execution, like every jax import here.

    started = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}"
    chosen = [e for e in EXPERIMENTS if not args.only or e.name in args.only]
    unknown = set(args.only or ()) - {e.name for e in EXPERIMENTS}
    if unknown:
        sys.exit(f"Unknown experiments {sorted(unknown)}; known: {', '.join(e.name for e in EXPERIMENTS)}.")
    shared, root = Path(args.shared_data), Path(args.workdir_root)
    ledger = protocol.TestLedger(args.ledger)
    results, skipped = {}, {}
    for exp in chosen:
        t0 = time.perf_counter()
        reason = _cannot_run(exp, root)
        if reason is None:
            try:
                result = run_experiment(
                    exp,
                    shared=shared,
                    root=root,
                    data_dir=args.data_dir,
                    bootstrap_samples=args.bootstrap_samples,
                    ledger=ledger,
                    allow_recipe_change=args.allow_recipe_change,
                )
            except protocol.RecipeChangedError as e:
                print(f"== {e}", flush=True)
                first = ledger.current(exp.name)
                result, reason = (
                    None,
                    (
                        f"recipe changed after its test was evaluated ({first['first_test']}, recipe "
                        f"{first['recipe']}); see `--allow_recipe_change`"
                    ),
                )
            else:
                shown = results_markdown.shown(shared / exp.data)
                reason = None if result is not None else f"no data at `{shown}`"
        if reason is not None:
            skipped[exp.name] = reason
            print(f"== {exp.name}: skipped, {reason}", flush=True)
            continue
        results[exp.name] = result
        print(f"== {exp.name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    invocation = results_markdown.invocation(
        only=args.only,
        started=started,
        note=args.note,
        bootstrap_samples=args.bootstrap_samples,
        shared=shared,
        experiments=[e.name for e in EXPERIMENTS],
        skipped=skipped,
    )
    written = f"{invocation['finished']} UTC by launch/reproduce.py"
    records = [results_markdown.record(r, shared=shared, written=written) for r in results.values()]
    results_markdown.write(Path(args.records), invocation, records)
    results_markdown.render(Path(args.records), Path(args.output))
    (root / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"Wrote {args.records}, {args.output} and {root / 'results.json'}.", flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
