"""Command-line entry point: ``python -m medjax.launch --config=configs/covid_ct.py:synthetic``.

Only parses flags and calls :func:`medjax.train.train_and_evaluate` (Flax-examples style), so tests and
notebooks run exactly what the command runs. Overrides use ml_collections syntax, e.g.
``--config.optim.learning_rate=3e-4``; the config is locked, so a misspelt key is an error that lists
the keys it may have meant. Running again with the same ``--workdir`` resumes from the latest checkpoint.

Several processes (GPUs of one machine, hosts of a cluster, a TPU slice) run the same command with
``--coordinator_address``, ``--num_processes`` and ``--process_id``, or with none of them under SLURM,
Open MPI or on a Cloud TPU VM (:mod:`medjax.distributed`; ``launch/`` has a script per setting).
"""

import sys
from pathlib import Path

from absl import flags

from medjax import allocator, cli, config_lib, cores, distributed
from medjax.errors import DatasetNotFoundError

_CONFIG = config_lib.define_config_flag("config", "Experiment config file, e.g. configs/covid_ct.py:smoke.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config>-<variant>).")
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir",
    "~/.cache/medjax/jax",
    "Persistent XLA compilation cache ('' disables): a resumed or repeated run skips recompiling its steps.",
)
_ALLOCATOR = cli.define_allocator_flag()
_DISTRIBUTED = distributed.define_flags()
flags.mark_flags_as_required(["config"])


def default_workdir(config_spec: str) -> Path:
    """``runs/covid_ct-synthetic`` for ``configs/covid_ct.py:synthetic``."""
    path, _, arg = config_spec.partition(":")
    name = Path(path).stem + (f"-{arg.replace(',', '_').replace('=', '-')}" if arg else "")
    return Path("runs") / name


def _parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, turning a bad ``--config.key`` override into a message with close matches."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error):
        spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        unknown = {}
        if spec is not None:
            try:
                unknown = config_lib.unknown_override_keys(config_lib.load_config_file(spec), argv)
            except Exception:  # The config itself is broken: the original error says more.
                unknown = {}
        if not unknown:
            raise
        lines = [
            f"  --config.{key}: not a key of {spec}; did you mean: {', '.join(m) or 'no close match'}?"
            for key, m in unknown.items()
        ]
        sys.exit("medjax: error: unknown config keys:\n" + "\n".join(lines))


def main(argv: list[str]) -> None:
    del argv
    config_lib.validate(_CONFIG.value)  # Before the allocator re-executes the command, and before any work.
    cli.setup(compilation_cache_dir=_CACHE_DIR.value, memory_allocator=_ALLOCATOR.value)
    from medjax import train  # Imported late so that --help stays fast.

    spec = flags.FLAGS["config"].serialize().split("=", 1)[1]
    workdir = Path(_WORKDIR.value) if _WORKDIR.value else default_workdir(spec)
    cores.limit(_CONFIG.value.get("cpu_cores"))  # Before JAX starts (train_and_evaluate checks again).
    distributed.initialize_from_flags(_DISTRIBUTED)  # Also before JAX starts its backends.
    print(
        f"medjax: config {spec}, workdir {workdir}, allocator {allocator.describe()}, "
        f"{len(cores.available())} CPU cores, {distributed.describe()}",
        flush=True,
    )
    try:
        train.train_and_evaluate(_CONFIG.value, workdir)
    except DatasetNotFoundError as e:
        demo = spec.partition(":")[0] + ":synthetic"
        raise DatasetNotFoundError(
            f"{e}\nTo try the same recipe offline on generated data: --config={demo}"
        ) from e


if __name__ == "__main__":
    cli.run(main, flags_parser=_parse_flags)
