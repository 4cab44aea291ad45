"""Fault injection: what a kill, a damaged file, a second launch or a full disk does to a run, and that
the workdir then resumes to the numbers of an uninterrupted run.

Every test starts from a copy of the session's finished smoke run (``conftest.smoke_run``: 8 steps,
evaluations and checkpoints at steps 4 and 8) or kills a fresh run at a chosen point through the
test-only hook ``MEDJAX_FAULT_AT=<point>:<step>`` (:mod:`medjax.checkpointing`).
"""

import errno
import json
import os
import shutil
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from medjax import checkpointing, cli, run_dir, train
from medjax.checkpointing import RunCheckpointer
from medjax.errors import CheckpointError
from medjax.run_dir import RunDir
from medjax.run_log import MetricWriter

from .conftest import launch_smoke, smoke_config

COMPARED = ("steps", "best_step", "stopped_early", "validation", "test")


def _copy_run(smoke_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(smoke_run, workdir, ignore=shutil.ignore_patterns(RunDir(smoke_run).lock_file.name))
    return workdir


def _report(workdir) -> dict:
    return {k: v for k, v in json.loads((workdir / "report.json").read_text()).items() if k in COMPARED}


@pytest.mark.slow
def test_kill_between_the_best_and_latest_saves_resumes_to_the_same_result(
    smoke_run, tmp_path, tfds_data_dir, compilation_cache
):
    workdir = tmp_path / "run"
    env = {checkpointing.FAULT_ENV: "after_best_save:4"}
    victim = launch_smoke(workdir, tfds_data_dir, compilation_cache, env=env)
    victim.communicate(timeout=600)
    assert victim.returncode == -9
    checkpoints = workdir / "checkpoints"
    assert (checkpoints / "best" / "4").is_dir() and not list((checkpoints / "latest").glob("[0-9]*"))

    report = train.train_and_evaluate(smoke_config(tfds_data_dir), workdir)  # Refused step 4 before.
    assert {k: report[k] for k in COMPARED} == _report(smoke_run)
    assert (workdir / "metrics.jsonl").read_text() == (smoke_run / "metrics.jsonl").read_text()


def _corrupt(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, min(len(data), len(data) // 3 + 64)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data[: max(1, len(data) // 2)]))


def _largest_tensor_file(step_dir):
    return max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("_CHECKPOINT_METADATA", "_CHECKPOINT_METADATA: unreadable JSON"),
        ("loop/metadata", "loop/metadata: unreadable JSON"),
        ("state/_METADATA", "state/_METADATA: unreadable JSON"),
        ("state/_sharding", "state/_sharding: unreadable JSON"),
        ("state/manifest.ocdbt", "latest/8: unreadable checkpoint"),
        ("tensor data", "latest/8: unreadable checkpoint"),
    ],
)
def test_each_damaged_checkpoint_file_is_named_and_the_previous_step_restored(
    kind, named, smoke_run, tmp_path
):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(smoke_run / "checkpoints", checkpoints)
    step_dir = checkpoints / "latest" / "8"
    _corrupt(_largest_tensor_file(step_dir) if kind == "tensor data" else step_dir / kind)
    ckpt = RunCheckpointer(checkpoints, keep=2, best_metric="loss", best_mode="min")
    said = []
    try:  # No data iterator: the loop re-derives the data position from the restored step.
        step, state, loop = ckpt.restore_latest(abstract_state=None, say=said.append)
    finally:
        ckpt.close()
    assert step == 4 and int(state["step"]) == 4 and "early_stopping" in loop
    assert named in said[0] and said[0].startswith("Checkpoint at step 8 is unusable")
    assert not step_dir.exists()  # Deleted, so the replay can save step 8 again.


def test_damaged_latest_checkpoint_and_torn_metrics_line_resume_to_the_same_result(
    smoke_run, tmp_path, tfds_data_dir, capsys
):
    workdir = _copy_run(smoke_run, tmp_path)
    (workdir / "report.json").unlink()
    _corrupt(workdir / "checkpoints" / "latest" / "8" / "loop" / "metadata")
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "kind": "tr')  # A kill mid-write.
    report = train.train_and_evaluate(smoke_config(tfds_data_dir), workdir)
    out = capsys.readouterr().out
    assert "latest/8/loop/metadata: unreadable JSON" in out
    assert "Resuming from the checkpoint at step 4" in out
    assert {k: report[k] for k in COMPARED} == _report(smoke_run)
    assert (workdir / "metrics.jsonl").read_text() == (smoke_run / "metrics.jsonl").read_text()


def test_metrics_file_damaged_before_its_last_line_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match=r"metrics.jsonl:2: damaged line"):
        MetricWriter(tmp_path / "metrics.jsonl", tmp_path / "tensorboard", resume_step=3)


def test_damaged_best_checkpoint_stops_inference_instead_of_predicting_nan(smoke_run, tmp_path):
    workdir = _copy_run(smoke_run, tmp_path)
    (best,) = (workdir / "checkpoints" / "best").glob("[0-9]*")
    variables = ocp.StandardCheckpointer().restore(best / "variables")
    variables["params"]["classifier"]["kernel"] = np.full_like(
        variables["params"]["classifier"]["kernel"], np.nan
    )
    shutil.rmtree(best / "variables")
    with ocp.StandardCheckpointer() as writer:
        writer.save(best / "variables", variables)
    with pytest.raises(CheckpointError, match=r"\['params'\]\['classifier'\]\['kernel'\] holds NaN"):
        run_dir.load_run(workdir)
    _corrupt(best / "_CHECKPOINT_METADATA")
    with pytest.raises(CheckpointError, match="_CHECKPOINT_METADATA: unreadable JSON"):
        run_dir.load_run(workdir)


@pytest.mark.slow
def test_a_second_launch_on_a_busy_workdir_is_refused_naming_the_first(
    tmp_path, tfds_data_dir, compilation_cache
):
    workdir = tmp_path / "run"
    first = launch_smoke(workdir, tfds_data_dir, compilation_cache)
    lock = RunDir(workdir).lock_file
    deadline = time.monotonic() + 300
    while not (lock.is_file() and lock.read_text()):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = launch_smoke(workdir, tfds_data_dir, compilation_cache)
    _, err = second.communicate(timeout=300)
    first.kill()
    first.communicate()
    assert second.returncode == 1
    assert err.startswith(f"medjax: error: workdir {workdir} is in use by pid {first.pid} on host")
    assert "Traceback" not in err


def test_a_config_that_fails_at_start_leaves_the_workdir_to_the_fixed_command(tmp_path, tfds_data_dir):
    workdir = tmp_path / "run"
    too_big = smoke_config(tfds_data_dir)
    too_big.data.batch_size = 128  # More than the 64 training examples.
    with pytest.raises(Exception, match="data.batch_size=128 exceeds the 64 training examples"):
        train.train_and_evaluate(too_big, workdir)
    assert not (workdir / "config.json").exists()
    # A workdir with no checkpoint has finished nothing: another config may take it over.
    (workdir / "config.json").write_text(json.dumps(too_big.to_dict(), default=str))
    train._check_workdir_config(RunDir(workdir), smoke_config(tfds_data_dir))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (a full disk after the first few files), or a skip where mounting is not allowed."""
    mount = tmp_path / "full"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_one_user_facing_error_naming_the_directory(small_tmpfs, tfds_data_dir):
    workdir = small_tmpfs / "run"
    with pytest.raises(OSError) as info:  # Orbax's wrapped TensorStore error, turned back into one.
        train.train_and_evaluate(smoke_config(tfds_data_dir), workdir)
    assert info.value.errno == errno.ENOSPC and cli.is_user_error(info.value)
    assert cli.error_paragraph(info.value).startswith(
        f"medjax: error: No space left on device: {workdir / 'checkpoints'}"
    )
    # Orbax left no partial step that a resume could mistake for a checkpoint.
    assert not list((workdir / "checkpoints").glob("*/[0-9]*[0-9]"))


def test_non_utf8_file_names_reach_the_prediction_csv(smoke_run, tmp_path):
    from PIL import Image

    from medjax import predict

    folder = tmp_path / "scans"
    folder.mkdir()
    name = os.fsdecode(b"scan_\xe9.png")  # Latin-1 on a UTF-8 system: not decodable.
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(folder / name)
    rows = predict.predict_files(run_dir.load_run(smoke_run), predict.find_images([folder]), batch_size=4)
    predict.write_csv(rows, tmp_path / "preds.csv")
    text = (tmp_path / "preds.csv").read_text(encoding="utf-8")
    assert "scan_\\xe9.png" in text and rows[0]["error"] == "" and rows[0]["prediction"]
