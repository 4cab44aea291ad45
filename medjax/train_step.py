"""The train state and the jitted train and evaluation steps, and :func:`build`, which makes them for a
config (with the dataset's metadata and the step counts): everything a run has before its first step.
:mod:`medjax.train` runs the loop around them.

The step functions are module-level pure functions, jitted once with the train state donated (its
buffers are reused in place, which halves peak memory for the parameters and optimizer state). Step
RNGs are ``fold_in(seed_key, step)``, so a resumed run needs no RNG in its checkpoint and replays the
same steps bit for bit.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh

from medjax import init_from, losses, models, optim, sharding, sliding_window, tasks, unfreeze
from medjax.data import pipeline
from medjax.errors import ConfigError


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
    phase: int | jax.Array | None = None,
    *,
    model,
    tx,
    loss_fn,
    task: ModuleType,
    frozen_stats=None,
    trainable=None,
    ema_decay: float = 0.0,
) -> tuple[TrainState, dict]:
    """One optimizer step on ``batch``; returns the new state and a flat dict of scalar metrics (the
    loss, each loss term, the gradient norm and the task's ``step_metrics``).

    ``frozen_stats`` (a pytree of Python bools over ``batch_stats``, see
    :func:`medjax.optim.frozen_statistics_mask`) keeps the running statistics of frozen BatchNorms.
    ``trainable`` (Python bools over ``params``, :func:`medjax.optim.trainable_mask`) puts the frozen
    parameters behind ``jax.lax.stop_gradient``, so the backward pass computes neither their gradients
    (they are zeros, and so is their part of the logged ``grad_norm``) nor anything below the first
    trainable layer; the trainable parameters' gradients are those of the full backward pass (to float32
    rounding: XLA compiles the smaller program's arithmetic in its own order).
    With an unfreezing schedule, ``phase`` is its current phase, ``tx.update`` receives it, and
    ``frozen_stats`` and ``trainable`` hold bool arrays indexed by it
    (:func:`medjax.optim.frozen_statistics_tables`, :func:`medjax.optim.trainable_tables`): with
    ``trainable``, ``phase`` must be a Python int (static: one compilation per phase, see
    :func:`make_steps`); without it, it may be a traced int32 scalar.
    ``ema_decay`` > 0 updates ``state.ema`` (see :func:`ema_update`).
    """
    rng = jax.random.fold_in(seed_key, state.step)

    def compute_loss(params):
        if trainable is not None:
            params = jax.tree.map(
                lambda p, t: p if (t if phase is None else t[phase]) else jax.lax.stop_gradient(p),
                params,
                trainable,
            )
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
        "grad_norm": optax.tree.norm(grads),
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
    model, tx, loss_fn, task: ModuleType, *, frozen_stats=None, trainable=None, ema_decay: float = 0.0
) -> tuple[Callable, Callable]:
    """Jitted ``(train_step, eval_step)``; the train state (argument 0) is donated, and an unfreezing
    schedule's ``phase`` (a Python int) is static: the step compiles once per phase, each without the
    backward pass of what that phase freezes (see :func:`train_step`)."""
    step = functools.partial(
        train_step,
        model=model,
        tx=tx,
        loss_fn=loss_fn,
        task=task,
        frozen_stats=frozen_stats,
        trainable=trainable,
        ema_decay=ema_decay,
    )
    p_train = jax.jit(step, donate_argnums=0, static_argnames="phase")
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


@dataclasses.dataclass
class Experiment:
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


def build(config: ml_collections.ConfigDict, extra_loss_terms: Mapping | None = None) -> Experiment:
    """Dataset metadata, step counts, model, loss, optimizer, initial state and the jitted steps.

    Reads the dataset's metadata (preparing it on first use) and ``init_from``'s weights, writes nothing.
    """
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
    trainable = frozen_stats = None
    phases = unfreeze.parse(config.optim.unfreeze)
    if phases is not None:
        trainable = optim.trainable_tables(abstract_params, phases)
    elif config.optim.trainable is not None:
        trainable = optim.trainable_mask(abstract_params, list(config.optim.trainable))
    if trainable is not None and config.optim.freeze_batch_stats:
        frozen = optim.frozen_statistics_mask if phases is None else optim.frozen_statistics_tables
        frozen_stats = frozen(trainable, state.batch_stats)
    p_train, p_eval = make_steps(
        model, tx, loss_fn, task, frozen_stats=frozen_stats, trainable=trainable, ema_decay=ema_decay
    )
    return Experiment(
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
