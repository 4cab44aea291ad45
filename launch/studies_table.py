"""The three studies' full 224 recipes in CPU time: epoch time and projected total, medjax against PyTorch.

Reads a ``launch/benchmark.py`` JSON (whole training steps and batch inference of each model at 224x224,
batch 32, on the benchmark's cores, medians over its rounds) and each study's config (model, input size,
batch, epochs), and multiplies: one epoch is the training split at the training rate plus the validation
split at the batch-inference rate; the total is the config's epochs times that. Neither framework's figure
counts data preparation, compilation, checkpoint writes or the input pipeline (medjax's runs overlap it with
the step), early stopping may end a run sooner, and epochs that train only part of the model (study C's
head-first schedule) run faster than a full step: the projection is the full recipe's upper bound, for both
frameworks alike. The benchmark's ConvNeXt-Tiny has the canonical head; study A's (dual pooling, SEVector,
0.3 M parameters on a pooled vector) costs nothing measurable beside the backbone. ``--measured`` adds a
real run's epoch time beside its projection, to say how far a projection is off.

Split sizes are the public releases' counts split as the configs' builders split them (about: the
builders' stratified, grouped rounding moves a few images): brain tumour MRI (4-class ``Training/``, 5,712
images, 10 % carved for validation), SARS-CoV-2 CT-scan (2,482 slices, 70/10/20), Kermany chest X-ray
(``train/``, 5,216 images, 20 % carved by patient; 1,044 validation images measured here)::

  python launch/studies_table.py results/benchmark_quiet_20261202.json
"""

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # Run as a script from anywhere: the configs import medjax.

from medjax import config_lib  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    config: str  # ``--config`` spec of the full recipe.
    dataset: str
    train_images: int
    validation_images: int


STUDIES = (
    Study("A: ConvNeXt-Tiny, study A's head", "configs/brain_mri.py", "brain tumour MRI", 5141, 571),
    Study(
        "B: MedNeXt-tiny from scratch", "configs/covid_ct.py:model=mednext_plos", "SARS-CoV-2 CT", 1737, 248
    ),
    Study("C: MobileNetV2 from ImageNet", "configs/chest_xray.py", "Kermany chest X-ray", 4172, 1044),
)
FRAMEWORKS = {"medjax": "medjax:{model}:fast", "PyTorch eager": "torch:{model}:eager"}
FRAMEWORKS["torch.compile"] = "torch:{model}:compile"


def epoch_seconds(study: Study, row: dict, statistic: str = "median") -> float:
    """Seconds of one epoch at a benchmark row's training and batch-inference rates."""
    return (
        study.train_images / row["train_images_per_s"][statistic]
        + study.validation_images / row["infer_images_per_s"][statistic]
    )


def rows(benchmark: dict) -> list[dict]:
    """Per study and framework: the config's epochs, epoch minutes (median, and the range the rounds'
    extremes give) and the projected total in hours."""
    meta = benchmark["meta"]
    by_case = {r["case"]: r for r in benchmark["summary"] if "train_images_per_s" in r}
    ran = {"image_size": 224, "batch_size": 32}  # benchmark.py's defaults, unless its argv says otherwise.
    for arg in meta["argv"]:
        for key, flag in (("image_size", "--size="), ("batch_size", "--batch=")):
            ran[key] = int(arg[len(flag) :]) if arg.startswith(flag) else ran[key]
    out = []
    for study in STUDIES:
        config = config_lib.load_config_file(str(REPO / study.config))
        for key, value in ran.items():
            if config.data[key] != value:
                raise ValueError(
                    f"{study.config}: data.{key} is {config.data[key]}, the benchmark ran {value}."
                )
        for framework, case in FRAMEWORKS.items():
            row = by_case.get(case.format(model=config.model_name))
            if row is None:
                continue
            minutes = {k: epoch_seconds(study, row, k) / 60 for k in ("median", "max", "min")}
            # The fastest rates give the shortest epoch: min/max swap.
            minutes["min"], minutes["max"] = minutes["max"], minutes["min"]
            out.append(
                {
                    "study": study,
                    "framework": framework,
                    "epochs": config.train.num_epochs,
                    "epoch_min": minutes,
                    "total_h": config.train.num_epochs * minutes["median"] / 60,
                }
            )
    return out


def markdown(table: list[dict], measured: dict[str, float]) -> str:
    head = (
        "| study | data (train / validation) | epochs | framework | epoch, min | projected total, h | time "
    )
    head += "vs medjax |"
    lines = [head, "|" + "---|" * 7]
    medjax = {r["study"].name: r["total_h"] for r in table if r["framework"] == "medjax"}
    for r in table:
        s, m = r["study"], r["epoch_min"]
        epoch = f"{m['median']:.1f} [{m['min']:.1f}-{m['max']:.1f}]"
        if r["framework"] == "medjax" and s.name[0] in measured:
            epoch += f"; measured {measured[s.name[0]]:.1f}"
        speed = r["total_h"] / medjax[s.name]
        lines.append(
            f"| {s.name} | {s.dataset} ({s.train_images:,} / {s.validation_images:,}) | {r['epochs']:g} | "
            f"{r['framework']} | {epoch} | {r['total_h']:.2f} | {speed:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("benchmark", type=Path, help="a launch/benchmark.py JSON")
    parser.add_argument(
        "--measured",
        action="append",
        default=[],
        help="STUDY=MINUTES, a real run's measured epoch (e.g. C=2.4), shown beside its projection",
    )
    args = parser.parse_args(argv)
    benchmark = json.loads(args.benchmark.read_text())
    measured = {k: float(v) for k, v in (m.split("=", 1) for m in args.measured)}
    meta = benchmark["meta"]
    loads = [x for r in benchmark["summary"] for pair in r.get("load", []) for x in pair]
    print(
        f"From {args.benchmark} ({meta['date_utc']}, commit {meta['commit']}, {meta['threads']} threads, "
        f"{meta['rounds']} rounds, load {min(loads):.1f}-{statistics.median(loads):.1f}-{max(loads):.1f}):\n"
    )
    print(markdown(rows(benchmark), measured))


if __name__ == "__main__":
    main()
