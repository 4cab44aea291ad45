"""Scale-out on one CPU: 4 simulated devices, and 2 processes joined by ``jax.distributed`` on 127.0.0.1.

JAX fixes its device count when it starts, so every multi-device or multi-process run is a
``python -m medjax.launch`` subprocess (the command a user types); the 1-device reference trains in the
test process. All runs train the same tiny ConvNeXt (``configs/brain_mri.py:smoke``, 32 px, 8 steps)
on the session's prepared data at the same global batch.

Tolerance: a data-parallel step computes the same mean gradient and the same (global-batch) statistics
as one device, but adds per-device partial sums, so float additions happen in another order: losses and
gradient norms agree to rounding (measured: 2e-7 relative after 8 AdamW steps), checked to ``RTOL``,
50x that, because AdamW divides by the root of tiny second moments and can amplify rounding. Two processes of
one device each run the same 2-way partitioned program whichever process holds which half, so a killed
and resumed 2-process run ends with bit-identical metrics to the uninterrupted one.

The 2-process tests are marked ``multiprocess`` (deselect with ``-m 'not multiprocess'``); CI runs them.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medjax.run_dir import RunDir
from tests.conftest import ROOT, smoke_config

SPEC = f"{ROOT}/configs/brain_mri.py:smoke"
RTOL = 1e-5  # Loss and metric agreement across device counts (see the module docstring).
HEARTBEAT_S = 10  # How long a dead process may stay silent before JAX stops the other one.
TIMEOUT_S = 1800  # A run takes ~1 min on 2 free cores; shared CI machines can be 10x slower.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, data_dir: Path, cache: str, *, devices: int = 1, process: tuple | None = None):
    """Starts ``python -m medjax.launch`` on the smoke config; output goes to ``<workdir>.<rank>.log``."""
    cmd = [
        sys.executable,
        "-m",
        "medjax.launch",
        f"--config={SPEC}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--compilation_cache_dir={cache}",
        "--allocator=system",
    ]
    rank = 0
    if process is not None:
        rank, port = process
        cmd += [
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={rank}",
            f"--heartbeat_timeout_seconds={HEARTBEAT_S}",
        ]
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    log = Path(f"{workdir}.{rank}.log")
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _finish(*procs, timeout: float = TIMEOUT_S) -> list[str]:
    """Waits for every process and returns their logs; fails with the log of one that failed."""
    logs = []
    for proc in procs:
        rc = proc.wait(timeout=timeout)
        logs.append(proc.log.read_text())
        assert rc == 0, logs[-1][-3000:]
    return logs


def _train_two_processes(workdir: Path, data_dir: Path, cache: str) -> list[str]:
    port = _free_port()
    return _finish(*[_launch(workdir, data_dir, cache, process=(rank, port)) for rank in range(2)])


def _metrics(workdir: Path, kind: str) -> dict[int, dict]:
    lines = [json.loads(line) for line in RunDir(workdir).metrics_file.read_text().splitlines()]
    return {r["step"]: r for r in lines if r["kind"] == kind}


def _assert_close(a, b, rtol: float = RTOL, path: str = "") -> None:
    """Numbers agree to ``rtol`` (absolute near zero), everything else exactly, recursively."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _assert_close(a[key], b[key], rtol, f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, rtol, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol, err_msg=path)
    else:
        assert a == b, f"{path}: {a} != {b}"


def _results(report: dict) -> dict:
    """What a report says about the model (not where or how fast it ran)."""
    return {k: report[k] for k in ("steps", "best_step", "num_params", "validation", "test")}


def _rewind(workdir: Path, to: Path, step: int) -> Path:
    """A copy of ``workdir`` as if the run had been killed just after its checkpoint at ``step``."""
    shutil.copytree(workdir, to)
    for series in ("latest", "best"):
        for ckpt in (RunDir(to).checkpoint_dir / series).iterdir():
            if ckpt.name.isdigit() and int(ckpt.name) > step:
                shutil.rmtree(ckpt)
    RunDir(to).report_file.unlink()
    return to


@pytest.fixture(scope="module")
def one_device_run(tfds_data_dir, tmp_path_factory) -> Path:
    from medjax import train

    workdir = tmp_path_factory.mktemp("one_device")
    train.train_and_evaluate(smoke_config(tfds_data_dir, SPEC), workdir)
    return workdir


@pytest.fixture(scope="module")
def four_device_run(one_device_run, tfds_data_dir, compilation_cache, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("four_devices") / "run"
    log = _finish(_launch(workdir, tfds_data_dir, compilation_cache, devices=4))[0]
    assert "process 0 of 1, 4 of 4 devices (cpu)" in log
    return workdir


def test_four_devices_follow_the_one_device_loss_trajectory(one_device_run, four_device_run):
    one, four = _metrics(one_device_run, "train"), _metrics(four_device_run, "train")
    assert sorted(one) == sorted(four) == [2, 4, 6, 8]
    for step in one:
        _assert_close(one[step]["loss"], four[step]["loss"])
    for step, val in _metrics(one_device_run, "validation").items():
        _assert_close(val["loss"], _metrics(four_device_run, "validation")[step]["loss"])
    report_1, report_4 = RunDir(one_device_run).read_report(), RunDir(four_device_run).read_report()
    assert (report_1["mesh"], report_4["mesh"]) == ({"data": 1, "model": 1}, {"data": 4, "model": 1})
    _assert_close(_results(report_1), _results(report_4))


def test_a_four_device_checkpoint_resumes_on_one_device(
    four_device_run, one_device_run, tfds_data_dir, tmp_path, capsys
):
    from medjax import train

    workdir = _rewind(four_device_run, tmp_path / "run", step=4)
    report = train.train_and_evaluate(smoke_config(tfds_data_dir, SPEC), workdir)
    assert "Resuming from the checkpoint at step 4" in capsys.readouterr().out
    assert report["mesh"] == {"data": 1, "model": 1} and report["steps"] == 8
    resumed, reference = _metrics(workdir, "train"), _metrics(one_device_run, "train")
    for step in (6, 8):  # Continued on one device where the 4-device run stopped.
        _assert_close(resumed[step]["loss"], reference[step]["loss"])
    _assert_close(_results(report), _results(RunDir(one_device_run).read_report()))


@pytest.fixture(scope="module")
def two_process_run(one_device_run, tfds_data_dir, compilation_cache, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("two_processes") / "run"
    logs = _train_two_processes(workdir, tfds_data_dir, compilation_cache)
    assert "process 1 of 2, 1 of 2 devices (cpu)" in logs[1]
    return workdir


@pytest.mark.multiprocess
def test_two_processes_train_together_like_one(two_process_run, one_device_run):
    report_1, report_2 = RunDir(one_device_run).read_report(), RunDir(two_process_run).read_report()
    assert (report_2["processes"], report_2["mesh"]) == (2, {"data": 2, "model": 1})
    _assert_close(_results(report_1), _results(report_2))
    train_2 = _metrics(two_process_run, "train")
    for step, record in _metrics(one_device_run, "train").items():
        _assert_close(record["loss"], train_2[step]["loss"])
    lines = RunDir(two_process_run).metrics_file.read_text().splitlines()
    assert len(lines) == len({(r["step"], r["kind"]) for r in map(json.loads, lines)})  # One writer.


@pytest.mark.multiprocess
def test_killing_one_process_stops_the_other_and_a_restart_resumes(
    two_process_run, tfds_data_dir, compilation_cache, tmp_path
):
    workdir = _rewind(two_process_run, tmp_path / "run", step=4)
    port = _free_port()
    survivor, victim = (_launch(workdir, tfds_data_dir, compilation_cache, process=(r, port)) for r in (0, 1))
    deadline = time.monotonic() + TIMEOUT_S
    while "Resuming from the checkpoint at step 4" not in victim.log.read_text():
        assert victim.poll() is None and time.monotonic() < deadline, victim.log.read_text()[-3000:]
        time.sleep(0.2)
    victim.kill()
    killed_at = time.monotonic()
    rc = survivor.wait(timeout=HEARTBEAT_S + 120)
    log = survivor.log.read_text()
    assert rc != 0 and "another task died" in log and "stopped sending heartbeats" in log, log[-3000:]
    print(f"the survivor stopped {time.monotonic() - killed_at:.1f} s after the kill")

    logs = _train_two_processes(workdir, tfds_data_dir, compilation_cache)
    assert all("Resuming from the checkpoint at step" in log.split("medjax: config")[-1] for log in logs)
    resumed, uninterrupted = RunDir(workdir).read_report(), RunDir(two_process_run).read_report()
    _assert_close(_results(resumed), _results(uninterrupted), rtol=0.0)


def test_initialize_needs_a_whole_layout_outside_a_cluster(monkeypatch):
    from medjax import distributed
    from medjax.errors import ConfigError

    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.cluster_detected() is None
    assert distributed.initialize() is False  # One process: nothing to join.
    with pytest.raises(ConfigError, match="--coordinator_address .* --num_processes and --process_id"):
        distributed.initialize(num_processes=2, process_id=0)
    with pytest.raises(ConfigError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
        distributed.initialize(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2)
    import jax

    jax.devices()  # Backends started: too late to join a multi-process run.
    with pytest.raises(ConfigError, match="before JAX starts its backends"):
        distributed.initialize(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0)


def test_param_spec_splits_the_largest_even_dimension():
    from jax.sharding import PartitionSpec as P

    from medjax.sharding import param_spec

    assert param_spec((3, 3, 16, 32), 2) == P(None, None, None, "model")  # Conv kernel: output channels.
    assert param_spec((64, 10), 2) == P("model")  # Dense kernel: the wider input side.
    assert param_spec((8, 8), 4) == P(None, "model")  # Ties: the last.
    assert param_spec((7,), 2) == param_spec((), 2) == P()  # Odd widths and scalars stay whole.
    assert param_spec((3, 3, 16, 32), 1) == P()
