"""Shared fixtures and settings: fast-compiling XLA, and one prepared dataset directory, compilation cache
and pair of smoke runs for the whole test session (shared by its xdist workers)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The suite compiles far more than it computes (tiny models, a few steps each). LLVM's optimisation level 0
# cuts XLA CPU's compile time by about 40 % (a tiny ConvNeXt's gradient: 13.0 -> 7.3 s of CPU) for a
# slower step at these sizes (7 -> 10 ms). Set before JAX starts its backend and inherited by every
# subprocess a test starts (it is part of the compilation cache's key); an optimisation level already in
# XLA_FLAGS is kept, so `XLA_FLAGS=--xla_backend_optimization_level=2 pytest` tests the default codegen.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout (or ``$MEDJAX_SHARED_DATA``); may not exist."""
    return Path(os.environ.get("MEDJAX_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_weights_dir() -> Path:
    """``../shared/weights`` beside the checkout (or ``$MEDJAX_SHARED_WEIGHTS``); may not exist."""
    return Path(os.environ.get("MEDJAX_SHARED_WEIGHTS", ROOT.parent / "shared" / "weights"))


def session_dir(tmp_path_factory, name: str) -> Path:
    """A directory ``name`` that every pytest-xdist worker of this run shares (each worker's own base
    temporary directory sits in one directory per run), or a fresh one when pytest runs in-process."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp(name)
    path = tmp_path_factory.getbasetemp().parent / name
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory) -> Path:
    """A TFDS data_dir reused by every test (and every xdist worker) of the session, so each small
    dataset is prepared once; :func:`medjax.data.builders.prepare` locks a preparation, so two workers
    needing one dataset at once wait for each other instead of racing."""
    return session_dir(tmp_path_factory, "tensorflow_datasets")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the session, shared by the xdist workers and the subprocesses they
    start: the end-to-end tests compile the same smoke models in several processes, and each compilation
    then happens once (about 45 s saved per repeat)."""
    import jax

    path = str(session_dir(tmp_path_factory, "jax_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    return path


SMOKE = f"{ROOT}/configs/chest_xray.py:smoke"  # MobileNetV2: the loop tests share one compiled step.


def launch_smoke(workdir, data_dir, cache_dir, *args, env=None, stderr=subprocess.PIPE) -> subprocess.Popen:
    """``python -m medjax.launch`` of the smoke config in a subprocess (text pipes), reading the session's
    prepared data and compilation cache; ``args`` are further flags, ``env`` extra variables."""
    cmd = [
        sys.executable,
        "-m",
        "medjax.launch",
        f"--config={SMOKE}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--compilation_cache_dir={cache_dir}",
        *args,
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def data_config(**values):
    """``config.data`` of the base config with ``values`` set (whole sections replaced), for tests that
    drive the pipeline without a config file."""
    from medjax import config_lib

    config = config_lib.base_config().data
    for key, value in values.items():
        config[key] = value
    return config


def optim_config(**overrides):
    """``config.optim`` of the base config with ``overrides`` (every key the optimizer reads is set)."""
    from medjax import config_lib

    config = config_lib.base_config().optim
    config.update(overrides)
    return config


def smoke_config(data_dir, spec: str = SMOKE, **train_overrides):
    """A smoke config reading the session's prepared data, with ``config.train`` overrides."""
    from medjax import config_lib

    config = config_lib.load_config_file(spec)
    config.data.data_dir = str(data_dir)
    config.train.update(train_overrides)
    return config


def _train_smoke(
    tfds_data_dir: Path, tmp_path_factory, name: str, *, seed: int = 0, **train_overrides
) -> Path:
    """The finished smoke run ``name``, trained by the first xdist worker that needs it; the others wait
    for it (a lock beside the run) and read the same directory, which no test may modify."""
    from medjax import locking, train
    from medjax.run_dir import RunDir

    root = session_dir(tmp_path_factory, "shared_runs")
    workdir = root / name
    with locking.exclusive(root / f".{name}.lock", what=f"session run {name}", wait=lambda holder: None):
        if not RunDir(workdir).report_file.is_file():  # A worker that died mid-run left it to resume.
            config = smoke_config(tfds_data_dir, **train_overrides)
            config.seed = seed
            train.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="session")
def smoke_run(tfds_data_dir, tmp_path_factory) -> Path:
    """A finished run directory of ``configs/chest_xray.py:smoke`` (MobileNetV2 on synthetic_ct, 32 px),
    trained once per session for the tests of evaluation, Grad-CAM, prediction and export. Its numbers are
    meaningless (a few steps); it exists to have real checkpoints, config.json and dataset.json."""
    return _train_smoke(tfds_data_dir, tmp_path_factory, "smoke_run")


@pytest.fixture(scope="session")
def second_smoke_run(tfds_data_dir, tmp_path_factory) -> Path:
    """Another run of the smoke config, with seed 1 and a single step: a distinct second model for the
    ensemble tests, and a source run to fine-tune."""
    return _train_smoke(
        tfds_data_dir, tmp_path_factory, "second_smoke_run", seed=1, num_epochs=1 / 8, eval_every_epochs=1 / 8
    )
