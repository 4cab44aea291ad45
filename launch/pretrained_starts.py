"""Pretrained starts against from-scratch at a few hundred labels, judged on validation only.

  JAX_PLATFORMS=cpu python launch/pretrained_starts.py --shared_data=../shared/data
  JAX_PLATFORMS=cpu python launch/pretrained_starts.py --models=convnext --methods=distillation --sizes=250
  JAX_PLATFORMS=cpu python launch/pretrained_starts.py --dataset=ucsd_covid_ct --sizes=250 --seeds=0,1,2 \
      --pretrain_set=train.num_epochs=100 --pretrain_set=loss.distillation.teacher_image_size=224

1. **Pretraining** (``configs/pretrain.py:pool=<pool>,method=<m>,model=<student>``) of each student,
   ConvNeXt with study A's head and MedNeXt, by each method (distillation from the ImageNet MobileNetV2,
   SimSiam) on the training images of ``--pool`` (default: the fine-tunes' own dataset, all of its
   training images, the way a user pretrains on an archive larger than its labelled part) without their
   labels; the validation split is never trained on. ``--pretrain_set key=value`` (repeatable) changes
   the pretraining config (runs kept apart by their settings).
2. **Fine-tuning** of ``configs/chest_xray.py:variant=scratch,model=<student>`` from scratch and from each
   pretraining run on grouped, stratified, nested subsets of the training images
   (``builder_kwargs.train_examples``, default 250 and 1,000), and of the ImageNet MobileNetV2 recipe
   (``configs/chest_xray.py:cpu``, 224 px RGB) as the reference. The students' fine-tunes run at least
   ``--min_steps`` optimiser steps (epochs raised for small subsets, the same rule for every start) and
   are validated every ``--eval_steps`` steps or so (whole epochs), so that early stopping's patience (5
   evaluations) spans as many steps as on the full set rather than a few dozen; no start is judged on a
   schedule too short for the others; ``--finetune_set key=value`` (repeatable) changes their recipe
   (runs kept apart by their settings). Each is repeated for every ``--seeds`` (initialisation, data
   order, augmentation; the labelled subset stays the same), because a validation split of about a
   hundred images moves AUC by several hundredths from seed to seed. The reference keeps its own recipe
   (``--dataset``: Kermany or UCSD).
3. **The table** (``--out``, default ``results/pretrained_starts_<dataset>.{json,md}``): validation AUC of
   every fine-tune's best checkpoint (mean and standard deviation over seeds), each start's gain over
   scratch, the pretraining wall times and, with ``--probe``, each start's linear probe
   (:mod:`medjax.probe`: a logistic regression on its frozen features, fitted on the same labelled
   images; for scratch the random initialisation, for the reference the ImageNet weights on the
   reference's input), which says whether a weak fine-tune is the start or the recipe. Test is never
   evaluated (``data.test_split=''``).

Every run keeps its directory under ``--workdir_root``; a finished one is read back and an interrupted one
resumes, so the command can be re-run after a kill and only the missing runs train.
"""

import datetime
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections
from absl import app, flags

from medjax import cli  # No jax: --help stays fast.

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = ("convnext", "mednext_plos")
METHODS = ("distillation", "simsiam")
REFERENCE = "mobilenet_v2_imagenet"
# Where the labelled fine-tunes run: the dataset's folder under --shared_data and the config of the
# ImageNet reference. The students' recipe is Kermany's scratch recipe (64 px grey) on either; UCSD
# COVID-CT keeps its official validation split (118 slices), Kermany its patient-grouped carve.
DATASETS = {"chest_xray": "configs/chest_xray.py:cpu", "ucsd_covid_ct": "configs/ucsd_covid_ct.py:cpu"}
DATASET_NAMES = {"chest_xray": "Kermany chest X-ray", "ucsd_covid_ct": "UCSD COVID-CT"}
VALIDATION = {
    "chest_xray": "the patient-grouped validation carve of train (1,044 images)",
    "ucsd_covid_ct": "the official validation split (118 slices)",
}


def _define_flags() -> None:
    """Defined only when run as a program, so tests can import this module beside other commands' flags."""
    flags.DEFINE_string(
        "shared_data",
        os.environ.get("MEDJAX_SHARED_DATA", str(ROOT.parent / "shared" / "data")),
        "Folder holding chest_xray/ (Kermany's layout); ../weights beside it holds the ImageNet MobileNetV2.",
    )
    flags.DEFINE_enum("dataset", "chest_xray", list(DATASETS), "Labelled set of the fine-tunes.")
    flags.DEFINE_enum(
        "pool", None, list(DATASETS), "Pretraining images (default: --dataset's training images)."
    )
    flags.DEFINE_list("models", list(STUDENTS), "Students: convnext (study A's head) and/or mednext_plos.")
    flags.DEFINE_list("methods", list(METHODS), "Pretraining methods: distillation and/or simsiam.")
    flags.DEFINE_list("sizes", ["250", "1000"], "Labelled training images of each fine-tune.")
    flags.DEFINE_bool("reference", True, "Also fine-tune the ImageNet MobileNetV2 recipe at each size.")
    flags.DEFINE_bool("probe", True, "Also score each start's frozen features by a linear probe (seconds).")
    flags.DEFINE_integer("min_steps", 600, "Fewest optimiser steps of a student's fine-tune.")
    flags.DEFINE_multi_string(
        "finetune_set", [], "key=value on the students' fine-tuning config, e.g. optim.learning_rate=1e-4."
    )
    flags.DEFINE_multi_string(
        "pretrain_set", [], "key=value on the pretraining config, e.g. train.num_epochs=100."
    )
    flags.DEFINE_list("seeds", ["0"], "Seeds of every fine-tune (one run each).")
    flags.DEFINE_integer("eval_steps", 100, "Fewest steps between a student's validations (whole epochs).")
    flags.DEFINE_string("workdir_root", str(ROOT / "runs" / "pretrained_starts"), "Run directories.")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir for the prepared datasets (default TFDS').")
    flags.DEFINE_string(
        "out", None, "Summary path without suffix (default results/pretrained_starts_<dataset>)."
    )
    flags.DEFINE_string("compilation_cache_dir", "~/.cache/medjax/jax", "Persistent XLA cache.")
    cli.define_allocator_flag()


def teacher_file(shared: Path) -> Path:
    """The ImageNet MobileNetV2 in ``../shared/weights`` beside the data folder."""
    from medjax import recipes

    return shared.parent / "weights" / recipes.IMAGENET_MOBILENET_V2_FILE


def pretrain_config(
    student: str,
    method: str,
    *,
    shared: Path,
    data_dir: str | None,
    pool: str = "chest_xray",
    overrides: Sequence[str] = (),
):
    """``configs/pretrain.py`` for ``student`` and ``method`` on the training images of ``pool`` (a key of
    :data:`DATASETS`) in place, with ``overrides`` (``'key=value'``) applied."""
    from medjax import config_lib

    config = config_lib.load_config_file(
        str(ROOT / f"configs/pretrain.py:pool={pool},method={method},model={student}")
    )
    config.data.manual_dir = str(shared / pool)
    config.data.data_dir = data_dir
    config.train.progress_bar = False
    if method == "distillation":
        config.loss.distillation.teacher = str(teacher_file(shared))
    return config_lib.apply_overrides(config, overrides)


def settings_suffix(overrides: Sequence[str]) -> str:
    """``'_num_epochs100_teacher_image_size224'``: the leaf keys and values of ``overrides``, for the
    directory of a run that differs from its recipe by them ('' for none)."""
    parts = []
    for assignment in overrides:
        key, _, value = assignment.partition("=")
        parts.append(key.rsplit(".", 1)[-1] + "".join(c for c in value if c.isalnum() or c in ".-"))
    return "".join(f"_{p}" for p in parts)


def finetune_config(
    start: str,
    size: int,
    *,
    dataset: str = "chest_xray",
    shared: Path,
    data_dir: str | None,
    min_steps: int,
    eval_steps: int,
    pretrained: Path | None,
    overrides: Sequence[str] = (),
    seed: int = 0,
):
    """The fine-tune of ``start`` (``'<student>/scratch'``, ``'<student>/<method>'`` or
    :data:`REFERENCE`) on ``size`` labelled images of ``dataset`` (a key of :data:`DATASETS`) with
    ``seed``; ``pretrained`` is the run a student starts from, ``overrides`` (``'key=value'``) change a
    student's recipe."""
    from medjax import config_lib

    if start == REFERENCE:
        config = config_lib.load_config_file(str(ROOT / DATASETS[dataset]))
        config.init_from.path = str(teacher_file(shared))
    else:
        student = start.split("/")[0]
        config = config_lib.load_config_file(
            str(ROOT / f"configs/chest_xray.py:variant=scratch,model={student}")
        )
        config.train.num_epochs = max(
            config.train.num_epochs, epochs_for(min_steps, size, config.data.batch_size)
        )
        config.train.eval_every_epochs = max(
            config.train.eval_every_epochs, epochs_for(eval_steps, size, config.data.batch_size)
        )
        if pretrained is not None:
            config.init_from.path = str(pretrained)
        if dataset != "chest_xray":
            config.data.name = dataset
            config.data.builder_kwargs = ml_collections.ConfigDict(
                {k: config.data.builder_kwargs[k] for k in ("image_size", "channels")}
            )
            config_lib.complete_builder_kwargs(config)
        config_lib.apply_overrides(config, overrides)
    config.seed = seed
    config.data.builder_kwargs.train_examples = size
    config.data.manual_dir = str(shared / dataset)
    config.data.data_dir = data_dir
    config.data.test_split = ""  # Judged on validation; test stays for a final recipe (medjax.protocol).
    config.train.progress_bar = False
    return config


def epochs_for(steps: int, examples: int, batch_size: int) -> float:
    """Whole epochs of ``examples`` (batches of ``batch_size``, the last partial one dropped) that give
    at least ``steps`` optimiser steps."""
    per_epoch = max(examples // batch_size, 1)
    return float(math.ceil(steps / per_epoch))


def gains(table: dict) -> dict:
    """``{start: {size: validation AUC gain over the same student from scratch}}`` of pretrained starts
    (means over seeds)."""
    out = {}
    for start, by_size in table.items():
        student, _, method = start.partition("/")
        scratch = table.get(f"{student}/scratch", {})
        if method and method != "scratch":
            out[start] = {n: r["auc"] - scratch[n]["auc"] for n, r in by_size.items() if n in scratch}
    return out


def summarise(runs: Sequence[dict]) -> dict:
    """One table cell from the fine-tunes of one start and size (one per seed): mean and (sample)
    standard deviation of their validation AUC, their total wall time, and the runs themselves."""
    aucs = [r["auc"] for r in runs]
    return {
        "auc": statistics.fmean(aucs),
        "auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else None,
        "wall_time_s": sum(r["wall_time_s"] for r in runs),
        "runs": list(runs),
    }


def probe_start(start: str, config: ml_collections.ConfigDict, pretrained: Path | None, shared: Path) -> dict:
    """:func:`medjax.probe.probe` of ``start``'s frozen features on the labelled images of its fine-tune
    ``config``: the pretraining run, the random initialisation (scratch) or the teacher (reference)."""
    from medjax import probe

    if start == REFERENCE:
        features = probe.teacher_features(str(teacher_file(shared)), config.data, image_size=None)
    elif pretrained is None:
        features = probe.initial_features(config)
    else:
        features = probe.run_features(pretrained)
    return probe.probe(features, config.data)


def _cell(result: dict | None, gain: float | None) -> str:
    if result is None:
        return "not run"
    sd = result.get("auc_sd")
    return (
        f"{result['auc']:.3f}"
        + (f" ± {sd:.3f}" if sd is not None else "")
        + (f" ({gain:+.3f})" if gain is not None else "")
    )


def markdown(record: dict) -> str:
    sizes = record["sizes"]
    dataset = record["dataset"]
    pool = DATASET_NAMES[record.get("pool", "chest_xray")]
    seeds = record.get("seeds", [0])
    recipe_changes = record.get("finetune_set", [])
    probes = any("probe" in r for by_size in record["table"].values() for r in by_size.values())
    lines = [
        f"# Pretrained starts against from-scratch (validation AUC, {DATASET_NAMES[dataset]})",
        "",
        f"Written {record['written']} by `{record['command']}`. Fine-tunes on grouped, stratified, nested "
        f"subsets of the {dataset} training images (`builder_kwargs.train_examples`), judged by the "
        f"validation AUC of their best checkpoint on {VALIDATION[dataset]} (test never evaluated)"
        + (f", mean ± sd over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "")
        + ". Students (64 px grey, Kermany's scratch recipe"
        + (f" with {', '.join(f'`{a}`' for a in recipe_changes)}" if recipe_changes else "")
        + f") run at least {record['min_steps']} steps, "
        f"validated every {record['eval_steps']} or more; the ImageNet reference keeps its own recipe "
        f"(`{DATASETS[dataset]}`)."
        + (
            f" Every start was pretrained on the {pool} training images without their labels (runs below)."
            if record["pretraining"]
            else ""
        )
        + (
            " Probe: validation AUC of a logistic regression on the start's frozen features, fitted on the "
            "same labelled images (`medjax/probe.py`; scratch: its random initialisation; reference: the "
            "ImageNet weights on its own input)."
            if probes
            else ""
        ),
        "",
        "| Start | "
        + " | ".join(f"{n} images: AUC (gain)" + (f" | {n}: probe" if probes else "") for n in sizes)
        + " | Fine-tune wall time |",
        "|---|" + "---|" * len(sizes) * (2 if probes else 1) + "---|",
    ]
    gain = gains(record["table"])
    for start, by_size in record["table"].items():
        cells = []
        for n in sizes:
            cells.append(_cell(by_size.get(n), gain.get(start, {}).get(n)))
            if probes:
                cells.append(f"{by_size[n]['probe']['auc']:.3f}" if "probe" in by_size.get(n, {}) else "")
        minutes = sum(r["wall_time_s"] for r in by_size.values()) / 60
        lines.append(f"| {start} | " + " | ".join(cells) + f" | {minutes:.1f} min |")
    lines += [
        "",
        "| Pretraining run | Epochs | Wall time | Validation loss | feature std |",
        "|---|---|---|---|---|",
    ]
    for name, p in record["pretraining"].items():
        lines.append(
            f"| {name} | {p['epochs']:g} | {p['wall_time_s'] / 60:.1f} min | {p['validation']['loss']:.4f} "
            f"| {p['validation'].get('feature_std', float('nan')):.3f} |"
        )
    if record.get("pretrain_set"):
        lines += ["", "Pretraining settings: " + ", ".join(f"`{a}`" for a in record["pretrain_set"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    args = flags.FLAGS
    cli.setup(compilation_cache_dir=args.compilation_cache_dir, memory_allocator=args.allocator)
    from medjax import train  # After the allocator re-execution, like every jax import here.

    shared, root = Path(args.shared_data), Path(args.workdir_root)
    pool = args.pool or args.dataset
    sizes = [int(n) for n in args.sizes]
    seeds = [int(s) for s in args.seeds]
    pretraining, table = {}, {}
    for student in args.models:
        for method in args.methods:
            name = f"{student}/{method}"
            config = pretrain_config(
                student, method, shared=shared, data_dir=args.data_dir, pool=pool, overrides=args.pretrain_set
            )
            workdir = root / "pretrain" / pool / (f"{method}_{student}" + settings_suffix(args.pretrain_set))
            report = train.train_or_read_back(config, workdir, announce=f"== {name}")
            pretraining[name] = {
                "workdir": str(workdir),
                "epochs": config.train.num_epochs,
                "wall_time_s": report["wall_time_s"],
                "validation": report["validation"],
            }
    starts = [f"{s}/{m}" for s in args.models for m in ("scratch", *args.methods)]
    starts += [REFERENCE] if args.reference else []
    for start in starts:
        reference = start == REFERENCE
        pretrained = None if reference or start.endswith("/scratch") else Path(pretraining[start]["workdir"])
        # A pretrained start's runs are named by its pretraining run as well as by their own settings.
        pretrained_suffix = "" if pretrained is None else f"_from_{pool}" + settings_suffix(args.pretrain_set)
        for n in sizes:
            runs = []
            for seed in seeds:
                config = finetune_config(
                    start,
                    n,
                    dataset=args.dataset,
                    shared=shared,
                    data_dir=args.data_dir,
                    min_steps=args.min_steps,
                    eval_steps=args.eval_steps,
                    pretrained=pretrained,
                    overrides=() if reference else args.finetune_set,
                    seed=seed,
                )
                run_name = (
                    f"n{n}"
                    + ("" if reference else settings_suffix(args.finetune_set))
                    + pretrained_suffix
                    + (f"_seed{seed}" if seed else "")
                )
                report = train.train_or_read_back(
                    config,
                    root / "finetune" / args.dataset / start.replace("/", "_") / run_name,
                    announce=f"== {start}, {n} images, seed {seed}",
                )
                runs.append(
                    {
                        "seed": seed,
                        "auc": report["validation"]["auc"],
                        "accuracy": report["validation"]["accuracy"],
                        "epochs": config.train.num_epochs,
                        "steps": report["steps"],
                        "best_step": report["best_step"],
                        "wall_time_s": report["wall_time_s"],
                    }
                )
            table.setdefault(start, {})[n] = {"train_examples": n, **summarise(runs)}
            if args.probe:
                table[start][n]["probe"] = probe_start(start, config, pretrained, shared)
    record = {
        "written": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "command": " ".join(["python", "launch/pretrained_starts.py", *sys.argv[1:]]),
        "dataset": args.dataset,
        "pool": pool,
        "sizes": sizes,
        "seeds": seeds,
        "min_steps": args.min_steps,
        "eval_steps": args.eval_steps,
        "finetune_set": args.finetune_set,
        "pretrain_set": args.pretrain_set,
        "pretraining": pretraining,
        "table": table,
        "gains": gains(table),
    }
    out = Path(args.out or ROOT / "results" / f"pretrained_starts_{args.dataset}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record) + f"Wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}.", flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
