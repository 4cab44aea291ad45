"""Optimizer, learning-rate schedule and selective unfreezing, built from ``config.optim``.

Selective unfreezing (study C) is expressed as regular expressions over parameter paths
(``'block_16/.*'``, ``'head/.*'``): matching parameters train, the rest get zero updates through
``optax.multi_transform``, so frozen weights stay bit-identical and need no optimizer state.
"""

import re
from collections.abc import Mapping, Sequence

import jax
import optax
from flax import traverse_util


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
    name = optim_cfg["name"]
    wd = float(optim_cfg["weight_decay"])
    b1, b2 = float(optim_cfg["b1"]), float(optim_cfg["b2"])
    if name == "adam":
        return optax.adam(schedule, b1=b1, b2=b2)
    if name == "adamw":
        # Decay only kernels (ndim > 1): biases, norm scales and layer-scale vectors are left alone,
        # as in the ConvNeXt and timm recipes.
        return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=wd, mask=_decay_mask)
    if name == "sgd":
        sgd = optax.sgd(
            schedule,
            momentum=float(optim_cfg["momentum"]),
            nesterov=bool(optim_cfg["nesterov"]),
        )
        return optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask), sgd) if wd else sgd
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


def make_optimizer(optim_cfg: Mapping, params, *, total_steps: int, steps_per_epoch: int):
    """The full gradient transformation and its schedule.

    Returns:
      ``(tx, schedule)``; ``schedule(step)`` is logged as the learning rate.
    """
    schedule = make_schedule(optim_cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    tx = _base_optimizer(optim_cfg, schedule)
    clip = optim_cfg["grad_clip_norm"]
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
    patterns = optim_cfg["trainable"]
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
