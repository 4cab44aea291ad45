"""``python -m medjax.evaluate``: flags and console output around
:func:`medjax.evaluate.command.evaluate_run`."""

from absl import app, flags

from medjax import cli
from medjax.errors import MedjaxError
from medjax.evaluate.command import evaluate_run
from medjax.run_dir import RunDir, report_paths

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
flags.DEFINE_bool("stratified", True, "Resample within each class (see medjax.evaluate.statistics).")


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
    for role, split in report["splits"].items():
        m = split["metrics"]
        print(
            f"{role}: "
            + ", ".join(f"{k} {v['value']:.4f} [{v['low']:.4f}, {v['high']:.4f}]" for k, v in m.items())
        )
    out = f.out or RunDir(f.workdir[0]).evaluation_dir
    print(f"Report: {report_paths(out)[1]}")


if __name__ == "__main__":
    cli.run(main)
