"""Training and evaluation: ``train_and_evaluate(config, workdir)`` is what the launcher, the tests and
notebooks call.

The step functions are module-level pure functions, jitted once with the train state donated (its
buffers are reused in place, which halves peak memory for the parameters and optimizer state). Step
RNGs are ``fold_in(seed_key, step)``, so a resumed run needs no RNG in its checkpoint and replays the
same steps bit for bit.
"""

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from medjax import (
    allocator,
    config_lib,
    cores,
    inference,
    init_from,
    locking,
    losses,
    models,
    optim,
    sharding,
    sliding_window,
    tasks,
    unfreeze,
)
from medjax.checkpointing import RunCheckpointer, has_checkpoints
from medjax.data import pipeline
from medjax.early_stopping import EarlyStopping
from medjax.errors import ConfigError, NonFiniteLossError
from medjax.run_dir import RunDir
from medjax.run_log import MetricWriter, Progress


@struct.dataclass
class TrainState:
    """Everything that changes during training (the model and optimizer definitions are static)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    loss_state: Any = struct.field(default_factory=dict)  # Stateful loss terms', e.g. class centres.
    ema: Any = struct.field(default_factory=dict)  # Moving average of `variables`; {} without one.

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def eval_variables(self) -> dict:
        """What is validated, kept as best and tested: the weight average when there is one."""
        return self.ema or self.variables


def ema_update(ema: dict, variables: dict, step: jax.Array, decay: float) -> dict:
    """``ema`` moved towards ``variables`` after ``step`` completed updates, with TensorFlow's warm-up:
    the decay is ``min(decay, (1 + step) / (10 + step))``, so the random initialisation fades quickly
    (see ``train.ema_decay`` in :func:`medjax.config_lib.base_config` for when ``decay`` binds)."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, v: d * e + (1.0 - d) * v, ema, variables)


def train_step(
    state: TrainState,
    batch: dict,
    seed_key: jax.Array,
    phase: jax.Array | None = None,
    *,
    model,
    tx,
    loss_fn,
    task: ModuleType,
    frozen_stats=None,
    ema_decay: float = 0.0,
) -> tuple[TrainState, dict]:
    """One optimizer step on ``batch``; returns the new state and a flat dict of scalar metrics (the
    loss, each loss term, the gradient norm and the task's ``step_metrics``).

    ``frozen_stats`` (a pytree of Python bools over ``batch_stats``, see
    :func:`medjax.optim.frozen_statistics_mask`) keeps the running statistics of frozen BatchNorms.
    With an unfreezing schedule, ``phase`` is its current phase (an int32 scalar, traced, so the step
    compiles once for all phases), ``tx.update`` receives it, and ``frozen_stats`` holds bool arrays
    indexed by it (:func:`medjax.optim.frozen_statistics_tables`).
    ``ema_decay`` > 0 updates ``state.ema`` (see :func:`ema_update`).
    """
    rng = jax.random.fold_in(seed_key, state.step)

    def compute_loss(params):
        (logits, aux), updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        total, terms = loss_fn(
            logits,
            batch["label"],
            aux,
            pixel_weights=batch.get("valid"),  # Segmentation: pixels outside the field of view never count.
            state=state.loss_state,
            step=state.step,
        )
        return total, (terms, updates.get("batch_stats", state.batch_stats), logits, aux)

    (total, (terms, batch_stats, logits, aux)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
        state.params
    )
    if frozen_stats is not None:
        batch_stats = jax.tree.map(
            lambda frozen, new, old: (
                jnp.where(jnp.asarray(frozen)[phase], old, new)
                if phase is not None
                else (old if frozen else new)
            ),
            frozen_stats,
            batch_stats,
            state.batch_stats,
        )
    phase_args = {} if phase is None else {"phase": phase}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **phase_args)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
        loss_state=loss_fn.update_state(state.loss_state, labels=batch["label"], aux=aux),
    )
    if ema_decay:
        new_state = new_state.replace(ema=ema_update(state.ema, new_state.variables, state.step, ema_decay))
    step_metrics = {
        "loss": total,
        **task.step_metrics(logits, batch),
        "grad_norm": optax.global_norm(grads),
        **{f"loss_{name}": value for name, value in terms.items()},
    }
    return new_state, step_metrics


def eval_step(variables: dict, batch: dict, loss_state: dict, *, model, loss_fn, task: ModuleType) -> dict:
    """The task's per-example outputs and the masked loss sum of one (possibly padded) evaluation batch.

    ``loss_state`` is the train state's (class centres of a center loss), so the validation loss is the
    training objective.
    """
    logits, aux = model.apply(variables, batch["image"], train=False)
    weights = batch["mask"].astype(jnp.float32)
    total, _ = loss_fn(
        logits, batch["label"], aux, weights, pixel_weights=batch.get("valid"), state=loss_state
    )
    return {**task.eval_outputs(logits, aux, batch), "loss_sum": total * weights.sum()}


def make_steps(
    model, tx, loss_fn, task: ModuleType, *, frozen_stats=None, ema_decay: float = 0.0
) -> tuple[Callable, Callable]:
    """Jitted ``(train_step, eval_step)``; the train state (argument 0) is donated."""
    step = functools.partial(
        train_step,
        model=model,
        tx=tx,
        loss_fn=loss_fn,
        task=task,
        frozen_stats=frozen_stats,
        ema_decay=ema_decay,
    )
    p_train = jax.jit(step, donate_argnums=0)
    p_eval = jax.jit(functools.partial(eval_step, model=model, loss_fn=loss_fn, task=task))
    return p_train, p_eval


def init_variables(model, *, rng: jax.Array, image_shape: tuple[int, ...]) -> dict:
    """Parameters (and BatchNorm statistics) for NHWC inputs of ``image_shape``.

    Jitted: one compilation instead of one per initializer call, which eager Flax init costs on CPU.
    """
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    return jax.jit(lambda key: model.init({"params": key, "dropout": key}, dummy, train=False))(rng)


def create_train_state(
    tx, variables: dict, loss_state: dict | None = None, *, with_ema: bool = False
) -> TrainState:
    """A fresh train state from initialised (or pretrained) variables and the optimizer state for them;
    ``with_ema`` starts a weight average at the initial variables."""
    params = variables["params"]
    state = TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        loss_state=loss_state or {},
    )
    # A copy: the state is donated, and the average must not alias the parameters' buffers.
    return state.replace(ema=jax.tree.map(jnp.copy, state.variables)) if with_ema else state


def evaluate(
    p_eval: Callable,
    variables: dict,
    data_cfg,
    *,
    split: str,
    mesh,
    task: ModuleType,
    class_names,
    loss_state=None,
) -> dict:
    """The task's validation metrics and the loss over every example of ``split`` exactly once, split
    over the processes (:func:`medjax.inference.predict_split` gathers their rows)."""
    predictions = inference.predict_split(
        lambda batch: p_eval(variables, batch, loss_state or {}), data_cfg, split=split, mesh=mesh
    )
    result = task.validation_metrics(predictions, class_names)
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


@dataclasses.dataclass
class _Experiment:
    """What a run builds from its config before the first step."""

    meta: pipeline.DatasetMetadata
    task: ModuleType
    mesh: Mesh
    seed_key: jax.Array
    total_steps: int
    eval_every: int
    schedule: optax.Schedule
    unfreeze: tuple[unfreeze.Phase, ...] | None
    steps_per_epoch: int
    state: TrainState
    p_train: Callable
    p_eval: Callable

    def evaluate(self, variables: dict, data_cfg, split: str, loss_state: dict) -> dict:
        return evaluate(
            self.p_eval,
            variables,
            data_cfg,
            split=split,
            mesh=self.mesh,
            task=self.task,
            class_names=self.meta.class_names,
            loss_state=loss_state,
        )


def _build(config: ml_collections.ConfigDict, extra_loss_terms: Mapping | None) -> _Experiment:
    """Dataset metadata, step counts, model, loss, optimizer, initial state and the jitted steps."""
    data_cfg = config.data
    task = tasks.get_task(config.task)
    # Reading the metadata prepares the dataset on first use: once, by process 0, before the others read.
    meta = pipeline.dataset_metadata(data_cfg) if sharding.is_primary() else None
    sharding.barrier("dataset prepared")
    meta = meta or pipeline.dataset_metadata(data_cfg)
    if meta.task != tasks.dataset_task(task):
        raise ConfigError(
            f"config.task={config.task!r} reads {tasks.dataset_task(task)} datasets but {data_cfg.name!r} is "
            f"a {meta.task} dataset: start the config from medjax.config_lib.base_config(task={meta.task!r}) "
            f"(or pick a {tasks.dataset_task(task)} dataset)."
        )
    mesh = sharding.make_mesh(config.mesh.param_shards)
    sharding.check_batch_size(data_cfg.batch_size, mesh)
    sharding.check_batch_size(data_cfg.eval_batch_size, mesh, what="data.eval_batch_size")
    steps_per_epoch = meta.num_examples[data_cfg.train_split] // data_cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.batch_size={data_cfg.batch_size} exceeds the {meta.num_examples[data_cfg.train_split]} "
            f"training examples of {data_cfg.name}."
        )
    total_steps = max(1, math.ceil(config.train.num_epochs * steps_per_epoch))

    model = sliding_window.wrap(
        models.get_model(
            config.model_name,
            num_classes=meta.num_classes,
            remat=config.train.get("remat", "none"),
            **config.model,
        ),
        config,
    )
    model = tasks.training_model(task, model, config)
    loss_fn = losses.make_loss_fn(
        config.loss,
        class_counts=meta.label_counts[data_cfg.train_split],
        extra_terms={**tasks.loss_terms(task), **(extra_loss_terms or {})},
    )
    seed_key = jax.random.key(config.seed, impl=config.rng_impl)
    image_shape = (data_cfg.image_size, data_cfg.image_size, data_cfg.channels)
    init_key = jax.random.fold_in(seed_key, -1 & 0x7FFFFFFF)
    abstract_variables = jax.eval_shape(lambda: init_variables(model, rng=init_key, image_shape=image_shape))
    abstract_params = abstract_variables["params"]
    loss_state = {}
    if loss_fn.stateful:  # Tracing the forward pass for the feature width costs seconds; only when needed.
        _, abstract_aux = jax.eval_shape(
            lambda v: model.apply(v, jnp.zeros((1, *image_shape)), train=False), abstract_variables
        )
        loss_state = loss_fn.init_state(
            num_classes=meta.num_classes, feature_dim=abstract_aux["features"].shape[-1]
        )
    tx, schedule = optim.make_optimizer(
        config.optim, abstract_params, total_steps=total_steps, steps_per_epoch=steps_per_epoch
    )
    ema_decay = config.train.ema_decay
    if not 0.0 <= ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={ema_decay} must be in [0, 1) (0 disables the weight average).")
    fresh = init_variables(model, rng=init_key, image_shape=image_shape)
    initial = init_from.initial_variables(config, model, fresh, image_shape)
    state = sharding.place_state(create_train_state(tx, initial, loss_state, with_ema=ema_decay > 0), mesh)
    frozen_stats = None
    phases = unfreeze.parse(config.optim.unfreeze)
    if phases is not None and config.optim.freeze_batch_stats:
        tables = optim.trainable_tables(abstract_params, phases)
        frozen_stats = optim.frozen_statistics_tables(tables, state.batch_stats)
    elif config.optim.trainable is not None and config.optim.freeze_batch_stats:
        trainable = optim.trainable_mask(abstract_params, list(config.optim.trainable))
        frozen_stats = optim.frozen_statistics_mask(trainable, state.batch_stats)
    p_train, p_eval = make_steps(model, tx, loss_fn, task, frozen_stats=frozen_stats, ema_decay=ema_decay)
    return _Experiment(
        meta=meta,
        task=task,
        mesh=mesh,
        seed_key=seed_key,
        total_steps=total_steps,
        eval_every=max(1, round(config.train.eval_every_epochs * steps_per_epoch)),
        schedule=schedule,
        unfreeze=phases,
        steps_per_epoch=steps_per_epoch,
        state=state,
        p_train=p_train,
        p_eval=p_eval,
    )


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


def _final_report(
    config, exp: _Experiment, ckpt: RunCheckpointer, writer: MetricWriter, state, **run
) -> dict:
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
        report[name] = exp.evaluate(variables, config.data, split, state.loss_state)
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


def _train_and_evaluate(config: ml_collections.ConfigDict, run: RunDir, extra_loss_terms) -> dict:
    """:func:`train_and_evaluate` once the config is valid and the workdir locked."""
    _check_workdir_config(run, config)
    t_start = time.perf_counter()
    data_cfg, train_cfg = config.data, config.train
    exp = _build(config, extra_loss_terms)
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
    try:
        while step < exp.total_steps and not stopped:
            phase_arg = ()
            if phases is not None:
                if phases.at_step(step):
                    stopper.bad_evals = 0  # Each phase gets the full early-stopping patience.
                    progress.message(f"step {step}: {phases.describe()}")
                phase_arg = (jnp.asarray(phases.phase, jnp.int32),)
            state, step_metrics = exp.p_train(
                state, sharding.shard_batch(next(train_iter), exp.mesh), exp.seed_key, *phase_arg
            )
            step += 1
            step_metrics = jax.device_get(step_metrics)
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
                val = exp.evaluate(state.eval_variables, data_cfg, data_cfg.eval_split, state.loss_state)
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
