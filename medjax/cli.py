"""What every medjax command does before its work, in one place.

Orbax and TFDS log every file operation at INFO, so unless ``--verbosity`` is given a command shows
warnings and its own lines only. A persistent XLA compilation cache lets a resumed or repeated run skip
recompiling its steps.
"""

from pathlib import Path

from absl import flags, logging


def setup(*, compilation_cache_dir: str | None = None) -> None:
    """Quiets library logs (unless ``--verbosity`` was given) and enables the compilation cache if set."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if compilation_cache_dir:
        import jax  # Late: `--help` of the commands stays fast.

        jax.config.update("jax_compilation_cache_dir", str(Path(compilation_cache_dir).expanduser()))
