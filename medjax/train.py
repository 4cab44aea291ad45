"""Training and evaluation: ``train_and_evaluate(config, workdir)`` is what the launcher, the tests and
notebooks call.

The loop around the steps of :mod:`medjax.train_step`: it locks the workdir, resumes from the latest
checkpoint, trains, evaluates on validation (keeping the best checkpoint, stopping early, moving the
unfreezing schedule on), checkpoints what a resume needs, and reports the best checkpoint's validation
and test metrics.
"""

import contextlib
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import ml_collections
import numpy as np

from medjax import allocator, config_lib, cores, inference, locking, memory, sharding, unfreeze
from medjax.checkpointing import RunCheckpointer, has_checkpoints
from medjax.data import pipeline
from medjax.early_stopping import EarlyStopping
from medjax.errors import ConfigError, NonFiniteLossError
from medjax.run_dir import RunDir
from medjax.run_log import MetricWriter, Progress

# create_train_state, init_variables and make_steps are named here too: launch/ab_step.py times this and
# older revisions (which defined them here) with one harness, launch/medjax_step.py, calling train.<name>.
from medjax.train_step import Experiment, build, create_train_state, init_variables, make_steps  # noqa: F401


def evaluate(exp: Experiment, variables: dict, data_cfg, split: str, loss_state: dict) -> dict:
    """The task's validation metrics and the loss over every example of ``split`` exactly once, split
    over the processes (:func:`medjax.inference.predict_split` gathers their rows)."""
    predictions = inference.predict_split(
        lambda batch: exp.p_eval(variables, batch, loss_state), data_cfg, split=split, mesh=exp.mesh
    )
    result = exp.task.validation_metrics(predictions, exp.meta.class_names)
    result["loss"] = float(predictions["loss_sum"]) / max(len(predictions["label"]), 1)
    return result


def _check_workdir_config(run: RunDir, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir whose checkpoints an incompatible config wrote (every process checks before
    process 0 rewrites ``config.json``). A workdir with no checkpoint has finished nothing, so any config
    may take it over (e.g. the same command with a smaller batch after a failed start)."""
    if run.is_run() and has_checkpoints(run.checkpoint_dir):
        differing = config_lib.differing_keys(run.read_config().to_dict(), config.to_dict())
        if differing:
            raise ConfigError(
                f"Workdir {run.path} was written by a different config; keys that differ: "
                f"{', '.join(differing)}. Use another --workdir, or delete this one to start over."
            )
    sharding.barrier("workdir config checked")


def _non_finite_message(step: int, step_metrics: dict, last_saved: int, run: RunDir) -> str:
    """What stopped the run and a way forward that the workdir will accept."""
    text = f"Non-finite training metrics at step {step}: {step_metrics}. "
    if not last_saved:
        return text + (
            "No checkpoint was saved yet, so this workdir has finished nothing: rerun with a lower "
            "optim.learning_rate or a set optim.grad_clip_norm (the changed config is accepted here)."
        )
    return text + (
        f"The last good checkpoint (step {last_saved}) is kept in {run.checkpoint_dir}. Its config is "
        "fixed, so rerunning here repeats the failure: rerun with a lower optim.learning_rate or a set "
        f"optim.grad_clip_norm in a new --workdir, or with --config.init_from.path={run.path} to fine-tune "
        "its best checkpoint."
    )


def _final_report(config, exp: Experiment, ckpt: RunCheckpointer, writer: MetricWriter, state, **run) -> dict:
    """Validation and test metrics of the best checkpoint (the last state if none was saved); no test
    metrics when ``data.test_split`` is empty (cross-validation folds, where test stays unseen)."""
    best_step = ckpt.best_step()
    variables = (
        ckpt.restore_best(abstract_variables=state.variables)
        if best_step is not None
        else state.eval_variables
    )
    report = {
        "config": config.get("name", config.model_name),
        "dataset": config.data.name,
        "model": config.model_name,
        "steps": run["step"],
        "total_steps": exp.total_steps,
        "stopped_early": bool(run["stopped"]),
        "best_step": best_step,
        "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
    }
    for name, split in (("validation", config.data.eval_split), ("test", config.data.test_split)):
        if not split:
            continue
        report[name] = evaluate(exp, variables, config.data, split, state.loss_state)
        writer.write(run["step"], name + "_best", report[name])
    return report


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, *, extra_loss_terms: Mapping | None = None
) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates on test.

    Args:
      config: an experiment config (see ``configs/`` and :func:`medjax.config_lib.base_config`).
      workdir: where checkpoints, metrics and the report go; an existing one is resumed.
      extra_loss_terms: loss terms by name beyond :data:`medjax.losses.TERMS` (e.g. from a notebook).

    Returns:
      The report also written to ``<workdir>/report.json``.

    Raises:
      ConfigError: for an invalid config, or a workdir whose checkpoints a different config wrote.
      BusyError: when another process is running in ``workdir`` (naming it).
      CheckpointError: for an unreadable run file (naming it); unreadable checkpoints are skipped.
      NonFiniteLossError: naming the step; the last good checkpoint stays in the workdir.

    The calling process is left as it is: ``config.cpu_cores`` and the memory allocator are process
    settings that entry points apply before JAX starts (``python -m medjax.launch``; in a notebook, call
    :func:`medjax.cores.limit` first).
    """
    config_lib.validate(config)
    run = RunDir(workdir)
    run.path.mkdir(parents=True, exist_ok=True)
    # One run per workdir for its life: two would interleave metrics and read each other's half-written
    # checkpoints. The processes of one multi-process run are one run: process 0 holds the lock for it.
    lock = (
        locking.exclusive(run.lock_file, what=f"workdir {run.path}")
        if sharding.is_primary()
        else contextlib.nullcontext()
    )
    with lock:
        return _train_and_evaluate(config, run, extra_loss_terms)


def train_or_read_back(config: ml_collections.ConfigDict, workdir: str | Path, *, announce: str = "") -> dict:
    """The training report of ``workdir``: read back when a run of this config finished there, else
    :func:`train_and_evaluate` (resuming an interrupted one), for scripts that run many experiments and are
    re-run after a kill. The dataset is prepared before the run's clock starts, so its wall time is
    training and evaluation only; ``announce`` is printed when training starts.

    Raises:
      As :func:`train_and_evaluate`; a run of another recipe in ``workdir`` is refused, not reported.
    """
    report = RunDir(workdir).finished_report(config)
    if report is not None:
        return report
    pipeline.dataset_metadata(config.data)
    if announce:
        print(announce, flush=True)
    return train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, run: RunDir, extra_loss_terms) -> dict:
    """:func:`train_and_evaluate` once the config is valid and the workdir locked."""
    _check_workdir_config(run, config)
    t_start = time.perf_counter()
    data_cfg, train_cfg = config.data, config.train
    exp = build(config, extra_loss_terms)
    primary = sharding.is_primary()  # The one process that writes files; all of them compute.
    if primary:
        run.write_config(config)  # Only once the run is known to start (a failed start leaves no trace).
        run.write_dataset_info(class_names=exp.meta.class_names, label_counts=exp.meta.label_counts)
    state = exp.state

    ckpt = run.checkpointer(config)
    step, state, loop_state = ckpt.restore_latest(abstract_state=state)
    if step:
        print(f"Resuming from the checkpoint at step {step} in {run.checkpoint_dir}.", flush=True)
    last_saved = step
    train_iter = iter(
        pipeline.make_train_loader(data_cfg, seed=config.seed, start_batch=step, **sharding.process_shard())
    )
    stopper = EarlyStopping(**train_cfg.early_stopping, state=loop_state.get("early_stopping"))
    stopped = loop_state.get("stopped", False)
    phases = None
    if exp.unfreeze is not None:
        phases = unfreeze.PhaseTracker(
            exp.unfreeze,
            steps_per_epoch=exp.steps_per_epoch,
            monitor=train_cfg.early_stopping.monitor,
            min_delta=train_cfg.early_stopping.min_delta,
            state=loop_state.get("unfreeze"),
        )
        print(phases.describe(), flush=True)
    writer = MetricWriter(
        run.metrics_file,
        run.tensorboard_dir,
        resume_step=step,
        resume_lines=loop_state.get("metrics_lines"),
        enabled=primary,
    )
    progress = Progress(
        total=exp.total_steps, initial=step, every=train_cfg.log_every_steps, enabled=train_cfg.progress_bar
    )
    window: list[dict] = []
    memory_plans = {}  # XLA's buffer plan of each compiled train step (one per unfreezing phase).
    try:
        while step < exp.total_steps and not stopped:
            phase_arg = {}
            if phases is not None:
                if phases.at_step(step):
                    stopper.bad_evals = 0  # Each phase gets the full early-stopping patience.
                    progress.message(f"step {step}: {phases.describe()}")
                phase_arg = {"phase": phases.phase}  # Static: one compiled step per phase.
            args = (state, sharding.shard_batch(next(train_iter), exp.mesh), exp.seed_key)
            new_step = phase_arg.get("phase") not in memory_plans
            if new_step:  # Compiled here, for the call below too: its plan costs no second compilation.
                memory_plans[phase_arg.get("phase")] = memory.planned_mb(exp.p_train, *args, **phase_arg)
            state, step_metrics = exp.p_train(*args, **phase_arg)
            step += 1
            step_metrics = jax.device_get(step_metrics)
            if new_step:
                progress.message(memory.describe(memory_plans[phase_arg.get("phase")], memory.peak_rss_mb()))
            if not all(np.isfinite(v) for v in step_metrics.values()):
                raise NonFiniteLossError(_non_finite_message(step, step_metrics, last_saved, run))
            window.append(step_metrics)
            progress.update(step, loss=float(step_metrics["loss"]))
            if step % train_cfg.log_every_steps == 0:
                summary = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                if phases is not None:
                    summary["unfreeze_phase"] = phases.phase
                writer.write(step, "train", {**summary, "learning_rate": float(exp.schedule(step - 1))})
                window = []
            evaluate_now = step % exp.eval_every == 0 or step == exp.total_steps
            if evaluate_now:
                val = evaluate(exp, state.eval_variables, data_cfg, data_cfg.eval_split, state.loss_state)
                writer.write(step, "validation", val)
                progress.message(f"step {step}: validation loss {val['loss']:.4f} {exp.task.headline(val)}")
                stopped = stopper.update(val[train_cfg.early_stopping.monitor])
                if phases is not None:
                    # Early stopping acts in the last phase only: an earlier phase ends by its schedule.
                    stopped = stopped and phases.phase == len(phases.phases) - 1
                    if phases.after_evaluation(val[train_cfg.early_stopping.monitor]):
                        stopper.bad_evals = 0
                        progress.message(f"step {step}: {phases.describe()}")
                scalars = {k: v for k, v in val.items() if np.isscalar(v)}
                ckpt.save_best(step, variables=state.eval_variables, metrics=scalars)
                if stopped:
                    progress.message(
                        f"Early stopping at step {step}: no improvement in {stopper.patience} evaluations."
                    )
            if evaluate_now or (
                train_cfg.checkpoint_every_steps and step % train_cfg.checkpoint_every_steps == 0
            ):
                loop = {"early_stopping": stopper.state(), "stopped": stopped, "metrics_lines": writer.lines}
                if phases is not None:
                    loop["unfreeze"] = phases.state()
                ckpt.save(step, state=state, loop_state=loop)
                last_saved = step
        progress.close()

        report = _final_report(config, exp, ckpt, writer, state, step=step, stopped=stopped)
        report["wall_time_s"] = time.perf_counter() - t_start
        report["allocator"] = allocator.active()  # Wall time depends on it (medjax/allocator.py).
        report["cpu_cores"] = len(cores.available())  # So does this (medjax/cores.py).
        report["processes"], report["mesh"] = jax.process_count(), dict(exp.mesh.shape)  # And these.
        report["memory"] = {  # The largest step's plan; the peak RSS adds what lives outside XLA's plan.
            "xla_planned_mb": max(memory_plans.values(), key=lambda p: p.get("total", 0), default={}),
            "peak_rss_mb": memory.peak_rss_mb(),
        }
        if primary:
            run.write_report(report)
        name, split = (
            ("test", data_cfg.test_split) if data_cfg.test_split else ("validation", data_cfg.eval_split)
        )
        print(
            f"{name.capitalize()} ({split}) with the best checkpoint (step {report['best_step']}): "
            f"{exp.task.headline(report[name])}. Report: {run.report_file}",
            flush=True,
        )
        return report
    finally:
        ckpt.close()
        writer.close()
