"""Study A's ablation (PAPERS.md A): each change to ConvNeXt added in turn, over several seeds.

Variants, cumulative as in the study's argument:

  (a) avg       global average pooling (canonical ConvNeXt head)
  (b) avg+max   + global max pooling, fused as ``model.fusion`` (default concat)
  (c) +SEVector + the SEVector channel gate on the pooled vector
  (d) +FS       + the feature-smoothing loss term

Each variant/seed runs ``medjax.train.train_and_evaluate`` in ``<workdir_root>/<variant>/seed_<s>``;
a run whose ``report.json`` exists is read back instead of rerun, and a half-finished one resumes from its
checkpoint, so an interrupted ablation continues where it stopped. Then the script writes a Markdown table
(mean ± sample std over seeds of the test metrics of the best-on-validation checkpoint, and wall time) to
``--output`` and the same numbers, per run and aggregated, to the ``.json`` beside it.

Variants (a)-(c) keep the feature-smoothing term at weight 0: it is still computed and logged, so the
"FS (train)" column shows the intra-class spread each variant reaches without optimising it.
A config that is not ConvNeXt (e.g. ``configs/pneumoniamnist.py``, MobileNetV2) gets the reduced ConvNeXt
of ``--depths``/``--widths``; every other setting comes from the config and its ``--config.*`` overrides.

Budget: each command below ran 4 variants x 3 seeds in 12 to 16 minutes on the 2 cores shared with other
jobs (about 45-60 s per run, 80-130 s for the first seed of a variant, which compiles)::

  JAX_PLATFORMS=cpu TFDS_DATA_DIR=/tmp/tfds python launch/ablate_convnext.py \\
      --config=configs/brain_mri.py:synthetic --config.data.image_size=32 \\
      --config.data.builder_kwargs.image_size=32 --widths=16,32,64,128 --config.train.num_epochs=6 \\
      --workdir_root=/tmp/ablation/synthetic_ct --output=results/ablation_synthetic_ct.md
  JAX_PLATFORMS=cpu TFDS_DATA_DIR=/tmp/tfds python launch/ablate_convnext.py \\
      --config=configs/pneumoniamnist.py --config.data.manual_dir=../shared/data/pneumoniamnist \\
      --config.data.image_size=28 --config.optim.warmup_epochs=0.3 --config.train.num_epochs=2 \\
      --widths=16,32,64,128 --workdir_root=/tmp/ablation/pneumoniamnist \\
      --output=results/ablation_pneumoniamnist.md
"""

import copy
import datetime
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from medjax import cli, config_lib
from medjax.run_dir import RunDir

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/brain_mri.py:synthetic", "Experiment config the variants start from."
)
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", None, "Run directories go here (kept; resumed).")
_OUTPUT = flags.DEFINE_string("output", None, "Markdown table path; the JSON goes beside it.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per variant: config.seed, config.seed + 1, ...")
_VARIANTS = flags.DEFINE_list("variants", None, "Subset of variant names to run (default: all).")
_DEPTHS = flags.DEFINE_list("depths", None, "ConvNeXt depths (default 2,2,2,2 for non-ConvNeXt configs).")
_WIDTHS = flags.DEFINE_list("widths", None, "ConvNeXt widths (default 32,64,128,256 likewise).")
_FS_WEIGHT = flags.DEFINE_float("fs_weight", 0.1, "Feature-smoothing weight of (d) if the config has none.")
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", "~/.cache/medjax/jax", "Persistent XLA cache: seeds 2.. reuse seed 1's compile."
)
flags.mark_flags_as_required(["workdir_root", "output"])

# name -> (description, model overrides ("config": the base config's value), feature smoothing weighted?).
VARIANTS = {
    "avg": ("(a) avg pooling", {"pooling": "avg", "sevector_ratio": None}, False),
    "avg+max": ("(b) + max pooling (avg+max)", {"pooling": "avg+max", "sevector_ratio": None}, False),
    "sevector": ("(c) + SEVector", {"pooling": "avg+max", "sevector_ratio": "config"}, False),
    "fs": ("(d) + feature smoothing", {"pooling": "avg+max", "sevector_ratio": "config"}, True),
}
METRICS = ("auc", "accuracy", "f1", "sensitivity", "specificity")
REDUCED_CONVNEXT = ((2, 2, 2, 2), (32, 64, 128, 256))  # As configs/brain_mri.py:synthetic.


def ablation_base(
    config: ml_collections.ConfigDict,
    *,
    depths: Sequence[int] | None,
    widths: Sequence[int] | None,
    fs_weight: float,
) -> ml_collections.ConfigDict:
    """The config every variant derives from: ConvNeXt, and a feature-smoothing term in the loss.

    The term keeps the config's own settings (brain_mri: weight 0.1 on L2-normalised features); a config
    without one gets ``fs_weight`` on normalised features, since raw ones stall training.
    """
    base = copy.deepcopy(config)
    with base.unlocked():
        if base.model_name != "convnext":
            depths = depths or REDUCED_CONVNEXT[0]
            widths = widths or REDUCED_CONVNEXT[1]
            base.model_name = "convnext"
            base.model = config_lib.model_config("convnext", sevector_ratio=16, fusion="concat")
        if depths:
            base.model.depths = tuple(int(d) for d in depths)
        if widths:
            base.model.widths = tuple(int(w) for w in widths)
        if base.model.sevector_ratio is None:
            base.model.sevector_ratio = 16
        if "feature_smoothing" not in base.loss:
            base.loss.feature_smoothing = {"weight": fs_weight, "normalize": True, "warmup_steps": 0}
    return base


def variant_config(base: ml_collections.ConfigDict, variant: str, seed: int) -> ml_collections.ConfigDict:
    """``base`` with the model head and loss of ``variant`` and ``seed``."""
    _, model_overrides, use_fs = VARIANTS[variant]
    config = copy.deepcopy(base)
    with config.unlocked():
        for key, value in model_overrides.items():
            config.model[key] = base.model[key] if value == "config" else value
        if not use_fs:
            config.loss.feature_smoothing.weight = 0.0  # Still logged: the spread without optimising it.
        config.seed = seed
    return config


def _last_train_value(workdir: Path, key: str) -> float | None:
    """The last logged training value of ``key`` in ``metrics.jsonl`` (None when absent)."""
    value = None
    path = RunDir(workdir).metrics_file
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["kind"] == "train" and key in record:
                value = record[key]
    return value


def run_one(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """The report of one variant/seed, trained now unless its ``report.json`` already exists.

    Raises:
      ConfigError: when the existing run was made with a different config (a stale table otherwise).
    """
    from medjax import train  # Late: jax reads the compilation cache setting first.

    report = RunDir(workdir).finished_report(config)
    if report is not None:
        print(f"Skipping {workdir}: it finished with this config.", flush=True)
    else:
        print(f"Training {workdir} ...", flush=True)
        report = train.train_and_evaluate(config, workdir)
    report["fs_train_last"] = _last_train_value(workdir, "loss_feature_smoothing")
    return report


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: Sequence[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    if mean != mean:  # NaN: the metric does not exist (e.g. sensitivity with more than two classes).
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: mean and std of each test metric, the wall time and the parameter count."""
    summary = {}
    for variant, reports in runs.items():
        entry = {"description": VARIANTS[variant][0], "seeds": len(reports)}
        for name in METRICS:
            mean, std = _mean_std([r["test"].get(name) for r in reports])
            entry[name] = {"mean": mean, "std": std}
        entry["wall_time_s"] = _mean_std([r["wall_time_s"] for r in reports])[0]
        entry["num_params"] = reports[0]["num_params"]
        summary[variant] = entry
    return summary


def settings_line(base: ml_collections.ConfigDict, *, spec: str, seeds: int, steps: int) -> str:
    """One line stating what was run, for the table header."""
    m, d, o = base.model, base.data, base.optim
    fs = base.loss.feature_smoothing
    shape = f"depths {tuple(m.depths)} widths {tuple(m.widths)}" if m.depths else f"'{m.variant}'"
    return (
        f"Config `{spec}`; dataset `{d.name}` at {d.image_size}x{d.image_size}x{d.channels}; "
        f"ConvNeXt {shape}, fusion {m.fusion}, SEVector ratio {m.sevector_ratio}, "
        f"drop path {m.drop_path_rate}; {base.train.num_epochs:g} epochs ({steps} steps) of batch "
        f"{d.batch_size}, {o.name} lr {o.learning_rate:g}; feature smoothing weight {fs.weight} "
        f"(normalize={fs.get('normalize', False)}, warmup_steps={fs.get('warmup_steps', 0)}) in (d), "
        f"logged at weight 0 in (a)-(c); {seeds} seed(s) "
        f"from {base.seed}; test metrics of the best-on-validation checkpoint "
        f"(`train.select_best_on={base.train.select_best_on}`)."
    )


def markdown_table(runs: dict[str, list[dict]], *, settings: str, total_time_s: float) -> str:
    """The ablation table: one row per variant, mean ± std over seeds."""
    header = ["variant", "seeds", "params", *(f"test {m}" for m in METRICS), "FS (train)", "wall time/run"]
    lines = [
        f"# Study A ablation: {next(iter(runs.values()))[0]['dataset']}",
        "",
        settings,
        "",
        f"Written {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; total wall time of the runs "
        f"{total_time_s / 60:.1f} min on 2 CPU cores shared with other jobs (timings are noisy). "
        "FS (train) is the last logged training value of the feature-smoothing term.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for variant, reports in runs.items():
        cells = [
            VARIANTS[variant][0],
            str(len(reports)),
            f"{reports[0]['num_params']:,}",
            *(_cell([r["test"].get(m) for r in reports]) for m in METRICS),
            _cell([r["fs_train_last"] for r in reports], digits=4),
            f"{_mean_std([r['wall_time_s'] for r in reports])[0]:.0f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    cli.setup(compilation_cache_dir=_CACHE_DIR.value)
    spec = flags.FLAGS["config"].serialize().split("=", 1)[1]
    base = ablation_base(
        _CONFIG.value, depths=_DEPTHS.value, widths=_WIDTHS.value, fs_weight=_FS_WEIGHT.value
    )
    variants = _VARIANTS.value or list(VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"Unknown variants {unknown}; known: {', '.join(VARIANTS)}.")

    root = Path(_WORKDIR_ROOT.value)
    runs: dict[str, list[dict]] = {}
    for variant in variants:
        for seed in range(base.seed, base.seed + _SEEDS.value):
            config = variant_config(base, variant, seed)
            runs.setdefault(variant, []).append(run_one(config, root / variant / f"seed_{seed}"))

    steps = next(iter(runs.values()))[0]["total_steps"]
    settings = settings_line(base, spec=spec, seeds=_SEEDS.value, steps=steps)
    total = sum(r["wall_time_s"] for reports in runs.values() for r in reports)
    output = Path(_OUTPUT.value)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown_table(runs, settings=settings, total_time_s=total))
    result = {
        "settings": settings,
        "config": spec,
        "base_config": base.to_dict(),
        "summary": summarize(runs),
        "runs": {
            v: [
                {"seed": seed, **{k: r[k] for k in ("test", "wall_time_s", "fs_train_last", "best_step")}}
                for seed, r in zip(range(base.seed, base.seed + len(reports)), reports, strict=True)
            ]
            for v, reports in runs.items()
        },
    }
    output.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    print(output.read_text(), flush=True)


if __name__ == "__main__":
    app.run(main)
