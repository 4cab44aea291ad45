"""Optimizer, learning-rate schedule and selective unfreezing, built from ``config.optim``.

Selective unfreezing (study C) is expressed as regular expressions over parameter paths
(``'block_16/.*'``, ``'head/.*'``). Statically (``optim.trainable``): matching parameters train, the rest
get zero updates through ``optax.multi_transform``, so frozen weights stay bit-identical and need no
optimizer state. As a schedule (``optim.unfreeze``, :mod:`medjax.unfreeze`): parameters are grouped by
the phases they train in, and each group's optimizer (Adam moments, momentum, weight decay) is gated by
``optax.transforms.conditionally_mask`` on the phase, passed to ``tx.update(..., phase=p)``.
A gated group's state does not move while it is frozen, so its Adam moments stay zero and its bias
correction starts afresh when it is unfrozen (with one shared step count, a group unfrozen at step 1000
would take its first hundreds of steps at 3-6x the learning rate). The learning rate itself follows the
global step, so the cosine schedule is one curve across phases.
"""

import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from medjax import unfreeze
from medjax.errors import ConfigError


def make_schedule(optim_cfg: Mapping, *, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up to ``learning_rate`` then cosine annealing (or constant).

    ``warmup_epochs`` is converted to steps; cosine decays to ``min_lr_ratio * learning_rate`` at
    ``total_steps``.
    """
    peak = float(optim_cfg["learning_rate"])
    warmup = min(round(float(optim_cfg["warmup_epochs"]) * steps_per_epoch), total_steps - 1)
    name = optim_cfg["schedule"]
    if name == "constant":
        after = optax.constant_schedule(peak)
    elif name == "cosine":
        decay_steps = max(total_steps - warmup, 1)
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(optim_cfg["min_lr_ratio"]))
    else:
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {name!r}")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _base_optimizer(optim_cfg: Mapping, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.chain(*_preconditioner(optim_cfg), optax.scale_by_learning_rate(schedule))


def _preconditioner(optim_cfg: Mapping) -> list[optax.GradientTransformation]:
    """``optim.name``'s optimizer without its learning rate, as the steps optax's ``adam``, ``adamw`` and
    ``sgd`` chain before ``scale_by_learning_rate`` (so the optimizer state has optax's layout)."""
    name = optim_cfg["name"]
    wd = float(optim_cfg["weight_decay"])
    b1, b2 = float(optim_cfg["b1"]), float(optim_cfg["b2"])
    if name == "adam":
        return [optax.scale_by_adam(b1=b1, b2=b2)]
    if name == "adamw":
        # Decay only kernels (ndim > 1): biases, norm scales and layer-scale vectors are left alone,
        # as in the ConvNeXt and timm recipes.
        return [optax.scale_by_adam(b1=b1, b2=b2), optax.add_decayed_weights(wd, mask=_decay_mask)]
    if name == "sgd":
        trace = optax.trace(decay=float(optim_cfg["momentum"]), nesterov=bool(optim_cfg["nesterov"]))
        # Weight decay as L2 added to the gradient before momentum (the classic SGD recipe).
        return [optax.add_decayed_weights(wd, mask=_decay_mask), trace] if wd else [trace]
    raise ValueError(f"optim.name must be 'adam', 'adamw' or 'sgd', got {name!r}")


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def trainable_mask(params, patterns: Sequence[str] | None) -> dict:
    """Pytree of bools: True where a parameter's ``'/'``-joined path matches one of ``patterns``.

    ``None`` means everything trains.

    Raises:
      ValueError: if a pattern matches no parameter (a typo would otherwise silently freeze everything).
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    if patterns is None:
        return traverse_util.unflatten_dict({k: True for k in flat}, sep="/")
    compiled = [re.compile(p) for p in patterns]
    unused = [p.pattern for p in compiled if not any(p.fullmatch(k) for k in flat)]
    if unused:
        examples = ", ".join([*list(flat)[:3], "...", *list(flat)[-3:]])
        raise ValueError(
            f"optim.trainable patterns match no parameter: {unused}. Parameter paths look like: {examples}"
        )
    return traverse_util.unflatten_dict({k: any(p.fullmatch(k) for p in compiled) for k in flat}, sep="/")


def trainable_tables(params, phases: Sequence[unfreeze.Phase]) -> dict:
    """Pytree over ``params`` of bool arrays ``[num_phases]``: does the parameter train in phase p.

    Raises:
      ValueError: for a pattern that matches no parameter (see :func:`trainable_mask`).
    """
    masks = [traverse_util.flatten_dict(trainable_mask(params, p.trainable), sep="/") for p in phases]
    return traverse_util.unflatten_dict({k: np.array([m[k] for m in masks]) for k in masks[0]}, sep="/")


def frozen_statistics_tables(tables: dict, batch_stats: dict) -> dict:
    """Pytree over ``batch_stats`` of bool arrays ``[num_phases]``: is the statistic frozen in phase p
    (its BatchNorm's scale and bias do not train then; see :func:`frozen_statistics_mask`)."""
    flat = traverse_util.flatten_dict(tables, sep="/")
    num_phases = len(next(iter(flat.values())))
    per_phase = [
        traverse_util.flatten_dict(
            frozen_statistics_mask(
                traverse_util.unflatten_dict({k: bool(v[p]) for k, v in flat.items()}, sep="/"), batch_stats
            ),
            sep="/",
        )
        for p in range(num_phases)
    ]
    return traverse_util.unflatten_dict(
        {k: np.array([m[k] for m in per_phase]) for k in per_phase[0]}, sep="/"
    )


def _mask_by_phase(tables: dict) -> optax.GradientTransformationExtraArgs:
    """Zeroes the gradients of parameters frozen in the current ``phase`` (so clipping sees only what
    trains)."""

    def update_fn(updates, state, params=None, *, phase, **extra_args):
        del params, extra_args
        return jax.tree.map(lambda g, t: jnp.where(jnp.asarray(t)[phase], g, 0), updates, tables), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def _phased(optim_cfg: Mapping, params, schedule: optax.Schedule, phases) -> optax.GradientTransformation:
    """Gradient masking, clipping, one gated preconditioner per group of parameters that train in the
    same phases, then the learning rate of the global step; ``update`` needs ``phase=``."""
    tables = trainable_tables(params, phases)
    labels = jax.tree.map(lambda t: "".join("1" if x else "0" for x in t), tables)
    groups = {}
    for label in set(jax.tree.leaves(labels)):
        active = jnp.asarray([c == "1" for c in label])
        if not active.any():
            groups[label] = optax.set_to_zero()
            continue
        groups[label] = optax.transforms.conditionally_mask(
            optax.chain(*_preconditioner(optim_cfg)),
            lambda step, *, phase, active=active, **_: active[phase],
            forward_extra_args=True,
        )
    clip = optim_cfg["grad_clip_norm"]
    return optax.chain(
        _mask_by_phase(tables),
        optax.clip_by_global_norm(float(clip)) if clip else optax.identity(),
        optax.multi_transform(groups, labels),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(optim_cfg: Mapping, params, *, total_steps: int, steps_per_epoch: int):
    """The full gradient transformation and its schedule.

    With ``optim.unfreeze`` set, ``tx.update`` takes the current phase as ``phase=`` (an int, or an int32
    scalar).

    Returns:
      ``(tx, schedule)``; ``schedule(step)`` is logged as the learning rate.

    Raises:
      ConfigError: for an invalid ``optim.unfreeze``, or one set together with ``optim.trainable``.
    """
    schedule = make_schedule(optim_cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    patterns = optim_cfg["trainable"]
    phases = unfreeze.parse(optim_cfg["unfreeze"])
    if phases is not None:
        if patterns is not None:
            raise ConfigError(
                "optim.trainable and optim.unfreeze are both set; unset optim.trainable (a single phase "
                "({'epoch': 0, 'trainable': patterns},) freezes statically)."
            )
        return _phased(optim_cfg, params, schedule, phases), schedule
    tx = _base_optimizer(optim_cfg, schedule)
    clip = optim_cfg["grad_clip_norm"]
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
    if patterns is not None:
        labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(params, list(patterns)))
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx, schedule


def frozen_statistics_mask(trainable: dict, batch_stats: dict) -> dict:
    """Pytree over ``batch_stats``: True where the BatchNorm that owns the statistic is frozen.

    A BatchNorm counts as frozen when none of its own parameters (scale, bias) train. Its running
    statistics then stay as loaded, so a frozen pretrained block keeps the normalisation it was trained
    with. (In training mode the block still normalises with batch statistics, as PyTorch does for a
    module with ``requires_grad=False`` left in ``train()`` mode.)
    """
    flat_trainable = traverse_util.flatten_dict(trainable, sep="/")
    module_trains: dict[str, bool] = {}
    for path, trains in flat_trainable.items():
        module = path.rsplit("/", 1)[0]
        module_trains[module] = module_trains.get(module, False) or trains
    flat_stats = traverse_util.flatten_dict(batch_stats, sep="/")
    return traverse_util.unflatten_dict(
        {path: not module_trains.get(path.rsplit("/", 1)[0], True) for path in flat_stats}, sep="/"
    )
