"""End to end: the smoke config trains, evaluates, writes its outputs, compiles once, resumes exactly
(also after SIGKILL), and stops on a non-finite loss keeping the last good checkpoint."""

import json
import os
import signal
import subprocess
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medjax import allocator, config_lib, init_from, models, run_dir, train, train_step
from medjax.errors import ConfigError, MedjaxError, NonFiniteLossError

from .conftest import ROOT, launch_smoke, smoke_config

COMPARED = ("steps", "best_step", "stopped_early", "validation", "test")


def _same_results(a: dict, b: dict) -> None:
    for key in COMPARED:
        assert a[key] == b[key], key


def test_smoke_run_writes_outputs_compiles_once_and_resumes(smoke_run, tmp_path, tfds_data_dir, monkeypatch):
    """The session's smoke run again (its compiled steps come from the compilation cache), logging every
    step: it writes every output, traces its step once, repeats the first run's numbers and resumes."""
    monkeypatch.setattr(train_step, "train_step", chex.assert_max_traces(train_step.train_step, n=1))
    workdir = tmp_path / "run"
    config = smoke_config(tfds_data_dir, log_every_steps=1)
    config.cpu_cores = 1  # A process setting: applied by entry points, never by the library function.
    affinity = os.sched_getaffinity(0)
    report = train.train_and_evaluate(config, workdir)

    assert os.sched_getaffinity(0) == affinity  # A notebook's kernel stays as it was.
    assert report["steps"] == 8 and report["total_steps"] == 8
    assert report["allocator"] == allocator.active()  # In-process: whatever pytest was started under.
    assert report["cpu_cores"] == len(affinity)  # The cores the wall time was measured on.
    plan = report["memory"]["xla_planned_mb"]  # Read from the step's one compilation (one trace above).
    assert 0 < plan["arguments"] < plan["total"] < report["memory"]["peak_rss_mb"]
    assert report["test"]["num_examples"] == 24  # Padded eval batches count every example once.
    for key in ("accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity", "loss"):
        assert key in report["test"]
    assert json.loads((workdir / "report.json").read_text())["test"] == report["test"]
    assert json.loads((workdir / "config.json").read_text())["data"]["name"] == "synthetic_ct"
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 9))
    assert [(r["step"], r["kind"]) for r in lines if r["kind"] != "train"] == [
        (4, "validation"),
        (8, "validation"),
        (8, "validation_best"),  # The best checkpoint's numbers, logged when the run ends.
        (8, "test_best"),
    ]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "checkpoints" / "latest" / "8").is_dir()
    assert (workdir / "checkpoints" / "best" / str(report["best_step"])).is_dir()
    # Logging every step and the core count change no number: the same results as the session's run.
    _same_results(report, json.loads((smoke_run / "report.json").read_text()))

    # Same workdir again: resumes at the final step, trains nothing, reports the same numbers.
    chex.clear_trace_counter()
    config = smoke_config(tfds_data_dir, log_every_steps=1)
    config.cpu_cores = 1
    again = train.train_and_evaluate(config, workdir)
    _same_results(report, again)


@pytest.mark.parametrize("name", ["covid_ct", "brain_mri", "pneumoniamnist"])
def test_every_smoke_variant_trains(name, tmp_path, tfds_data_dir):
    config = smoke_config(
        tfds_data_dir, f"{ROOT}/configs/{name}.py:smoke", num_epochs=2 / 8, eval_every_epochs=2 / 8
    )
    report = train.train_and_evaluate(config, tmp_path / name)
    assert report["steps"] == 2 and report["model"] == config.model_name
    assert 0.0 <= report["test"]["auc"] <= 1.0


def test_breastmnist_smoke_variant_is_pneumoniamnists_at_another_learning_rate():
    """Both are ``config_lib.medmnist_config``'s smoke variant: training breastmnist's would compile and
    run pneumoniamnist's case again. Should breastmnist's smoke variant gain anything of its own, this
    fails, and it belongs in the parametrization above."""
    pneumonia, breast = (
        config_lib.load_config_file(f"{ROOT}/configs/{name}.py:smoke")
        for name in ("pneumoniamnist", "breastmnist")
    )
    assert config_lib.differing_keys(pneumonia.to_dict(), breast.to_dict()) == ["name", "optim.learning_rate"]


def test_weight_average_is_what_is_selected_checkpointed_and_resumed(tmp_path, tfds_data_dir):
    config = smoke_config(tfds_data_dir, num_epochs=2 / 8, eval_every_epochs=2 / 8, ema_decay=0.5)
    workdir = tmp_path / "run"
    report = train.train_and_evaluate(config, workdir)
    saved = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "latest" / "2" / "state")
    best = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "best" / "2" / "variables")
    chex.assert_trees_all_equal(best, saved["ema"])
    assert not np.allclose(
        saved["ema"]["params"]["classifier"]["kernel"], saved["params"]["classifier"]["kernel"]
    )
    _same_results(report, train.train_and_evaluate(config, workdir))  # Resumes at the end, same numbers.


def test_workdir_of_another_config_is_refused(tmp_path, tfds_data_dir):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "latest" / "4").mkdir(parents=True)  # It has finished something.
    other = smoke_config(tfds_data_dir)
    other.optim.learning_rate = 0.5
    (workdir / "config.json").write_text(config_lib.to_json(other))
    with pytest.raises(ConfigError, match="keys that differ: optim.learning_rate"):
        train.train_and_evaluate(smoke_config(tfds_data_dir), workdir)


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_checkpoint(
    tmp_path, tfds_data_dir, monkeypatch
):
    """The smoke config's own compiled step (from the compilation cache), whose loss turns NaN at step 6
    on its way to the loop."""
    original = train_step.make_steps

    def poisoned_steps(*args, **kwargs):
        p_train, p_eval = original(*args, **kwargs)

        def p_train_poisoned(state, *batch_args, **kwargs):
            new_state, metrics = p_train(state, *batch_args, **kwargs)
            if int(new_state.step) >= 6:
                metrics = {**metrics, "loss": jnp.full_like(metrics["loss"], jnp.nan)}
            return new_state, metrics

        p_train_poisoned.lower = p_train.lower  # The loop reads XLA's plan of the step it wraps.
        return p_train_poisoned, p_eval

    monkeypatch.setattr(train_step, "make_steps", poisoned_steps)
    workdir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"step 6.*last good checkpoint \(step 4\)"):
        train.train_and_evaluate(smoke_config(tfds_data_dir), workdir)
    assert sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir() if p.name.isdigit()) == ["4"]
    assert not (workdir / "report.json").exists()


@pytest.mark.slow
def test_sigkill_and_restart_matches_uninterrupted_run(
    smoke_run, tmp_path, tfds_data_dir, compilation_cache, capsys
):
    workdir = tmp_path / "killed"
    victim = launch_smoke(workdir, tfds_data_dir, compilation_cache, stderr=subprocess.STDOUT)
    latest = workdir / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not (latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir())):
        assert victim.poll() is None, "run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)  # Whatever it was doing: the save may still be in flight.
    victim.wait()
    assert not (workdir / "report.json").exists(), "the run finished before it could be killed"

    # The session's smoke_run is the same config, uninterrupted.
    resumed = train.train_and_evaluate(smoke_config(tfds_data_dir), workdir)
    assert "Resuming from the checkpoint at step 4" in capsys.readouterr().out
    _same_results(resumed, json.loads((smoke_run / "report.json").read_text()))


def test_init_from_keras_weights_file(tmp_path, tfds_data_dir, capsys):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    source = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=True, weights=None, classes=5
    )
    weights = tmp_path / "mobilenet.weights.h5"
    source.save_weights(weights)

    config = smoke_config(tfds_data_dir, num_epochs=1 / 8, eval_every_epochs=1 / 8)
    config.model.update({"padding_style": "tf", "bn_epsilon": 1e-3})
    config.init_from.path = str(weights)
    report = train.train_and_evaluate(config, tmp_path / "run")
    out = capsys.readouterr().out
    assert "Loaded" in out and "(scheme 'keras')" in out
    assert "params/classifier/kernel" in out  # 5-class head kept fresh for the 2-class task.
    assert report["steps"] == 1


def test_init_from_a_run_directory_fine_tunes_its_best_checkpoint(
    tmp_path, tfds_data_dir, second_smoke_run, capsys
):
    best = run_dir.load_run(second_smoke_run).variables
    config = smoke_config(tfds_data_dir)
    config.init_from.update({"path": str(second_smoke_run), "reinit_head": True})
    model = models.get_model(config.model_name, num_classes=2, **config.model)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    key = jax.random.key(7)
    fresh = train_step.init_variables(model, rng=key, image_shape=shape)
    started = init_from.initial_variables(config, model, fresh, shape)
    assert "output layer ['classifier'] re-initialised" in capsys.readouterr().out
    chex.assert_trees_all_equal(started["params"].pop("classifier"), fresh["params"]["classifier"])
    best["params"].pop("classifier")
    chex.assert_trees_all_equal(started, best)

    config.model.width_multiplier = 0.5
    wider = models.get_model(config.model_name, num_classes=2, **config.model)
    with pytest.raises(
        MedjaxError,
        match=r"(?s)mobilenet_v2 \(187 array\(s\)\):\n  mis-shaped: batch_stats/block_1/project_bn/mean: "
        r"run \(8,\), model \(16,\).*\.\.\. and 177 more\n",
    ):
        init_from.initial_variables(
            config, wider, train_step.init_variables(wider, rng=key, image_shape=shape), shape
        )
    config.init_from.path = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match="absent does not exist"):
        init_from.initial_variables(config, model, fresh, shape)


@pytest.mark.parametrize(
    "name, kwargs, head",
    [
        ("mobilenet_v2", {"width_multiplier": 0.35}, {"classifier"}),
        ("convnext", {"depths": (1, 1, 1, 1), "widths": (8, 16, 32, 64)}, {"classifier"}),
        ("mednext_plos", {"depths": (1, 1, 1, 1), "widths": (8, 16, 32, 64)}, {"head"}),
    ],
)
def test_output_layer_is_found_by_its_class_count_dependence(name, kwargs, head):
    model = models.get_model(name, num_classes=3, **kwargs)
    assert init_from.output_layers(model, (32, 32, 1)) == head


def test_center_loss_centres_train_and_are_checkpointed(tmp_path, tfds_data_dir):
    config = smoke_config(tfds_data_dir, num_epochs=2 / 8, eval_every_epochs=2 / 8, log_every_steps=1)
    config.loss.center_loss = {"weight": 0.01, "warmup_steps": 1, "update_rate": 0.5}
    workdir = tmp_path / "run"
    report = train.train_and_evaluate(config, workdir)
    assert report["steps"] == 2
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_center_loss" in r for r in lines if r["kind"] == "train")

    saved = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "latest" / "2" / "state")
    centers = np.asarray(saved["loss_state"]["center_loss"]["centers"])
    assert centers.shape[0] == 2  # One centre per class of synthetic_ct.
    assert np.all(np.isfinite(centers)) and np.abs(centers).sum() > 0  # Moved from their zero start.
