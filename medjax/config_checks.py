"""Range and choice checks of every config value the library reads, run before any work starts.

A misspelt metric name or a zero batch size used to surface 20-30 s into a run as a ``KeyError`` or a
``ZeroDivisionError`` from deep inside the loop. Here each key has one rule (a range or a set of choices),
all rules run at load time (:func:`medjax.config_lib.validate`, called by the launcher and by
``train_and_evaluate``), and every violation is reported at once in a :class:`~medjax.errors.ConfigError`
naming the key, its value and what it accepts. Builder kwargs are checked by building the dataset's own
``Config`` (its ``__post_init__`` holds the dataset's rules), without touching any file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from medjax.errors import ConfigError

METRIC_KEYS = ("train.early_stopping.monitor", "train.select_best_on")


@dataclasses.dataclass(frozen=True)
class Range:
    """A number in ``[low, high]`` (ends excluded where ``open_low``/``open_high``); ``integer`` demands an
    int; ``optional`` accepts None; ``per_channel`` also accepts a sequence of such numbers."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    integer: bool = False
    optional: bool = False
    per_channel: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if self.per_channel and isinstance(value, tuple | list) and value:
            problems = [p for v in value if (p := dataclasses.replace(self, per_channel=False).problem(v))]
            return f"{problems[0]} (each)" if problems else None
        kind = int if self.integer else int | float
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"must be {'an integer' if self.integer else 'a number'}{' or None' * self.optional}"
        too_low = value <= self.low if self.open_low else value < self.low
        too_high = value >= self.high if self.open_high else value > self.high
        if math.isnan(value) or too_low or too_high:
            return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.open_low else '>='} {_num(self.low)}"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of ``choices`` (a tuple, or a function returning them, for registries read lazily)."""

    choices: Sequence | Callable[[], Sequence]

    def problem(self, value: Any) -> str | None:
        options = self.choices() if callable(self.choices) else self.choices
        if value in options and not isinstance(value, bool):
            return None
        return f"must be one of {', '.join(map(repr, options))}"


def _models() -> list[str]:
    from medjax import models

    return models.available_models()


def _metric_problem(task_name: str, value: Any) -> str | None:
    """Whether ``value`` names a validation metric of the task (its module's ``VALIDATION_METRICS``, or a
    ``PER_CLASS_METRICS`` prefix followed by ``_<class name>``, since class names come with the data)."""
    from medjax import tasks

    task = tasks.get_task(task_name)
    prefixes = getattr(task, "PER_CLASS_METRICS", ())
    if isinstance(value, str) and any(value.startswith(f"{p}_") and value != f"{p}_" for p in prefixes):
        return None
    problem = Choice(task.VALIDATION_METRICS).problem(value)
    return problem and problem + "".join(f", {p}_<class name>" for p in prefixes)


def _tasks() -> list[str]:
    from medjax import tasks

    return tasks.available_tasks()


def _remat_policies() -> list[str]:
    from medjax.models import layers

    return list(layers.REMAT_POLICIES)


def _datasets() -> list[str]:
    from medjax.data import builders

    return builders.available_datasets()


POSITIVE_INT = Range(1, integer=True)
NON_NEGATIVE_INT = Range(0, integer=True)
POSITIVE = Range(0, open_low=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)
UNIT_OPEN_HIGH = Range(0, 1, open_high=True)

RULES: dict[str, Range | Choice] = {
    "task": Choice(_tasks),
    "seed": Range(integer=True),
    "rng_impl": Choice(("rbg", "unsafe_rbg", "threefry2x32")),
    "cpu_cores": Range(1, integer=True, optional=True),
    "model_name": Choice(_models),
    "data.name": Choice(_datasets),
    "data.image_size": POSITIVE_INT,
    "data.channels": Choice((1, 3)),
    "data.batch_size": POSITIVE_INT,
    "data.eval_batch_size": POSITIVE_INT,
    "data.num_workers": NON_NEGATIVE_INT,
    "data.normalize.std": Range(0, open_low=True, per_channel=True),
    "data.augment.rotation_degrees": Range(0, 180),
    "data.augment.brightness": UNIT_OPEN_HIGH,
    "data.augment.contrast": UNIT_OPEN_HIGH,
    "optim.name": Choice(("adam", "adamw", "sgd")),
    "optim.learning_rate": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.b1": UNIT_OPEN_HIGH,
    "optim.b2": UNIT_OPEN_HIGH,
    "optim.momentum": UNIT_OPEN_HIGH,
    "optim.schedule": Choice(("cosine", "constant")),
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.min_lr_ratio": UNIT,
    "optim.grad_clip_norm": Range(0, open_low=True, optional=True),
    "train.num_epochs": POSITIVE,
    "train.eval_every_epochs": POSITIVE,
    "train.log_every_steps": POSITIVE_INT,
    "train.checkpoint_every_steps": NON_NEGATIVE_INT,
    "train.keep_checkpoints": POSITIVE_INT,  # 0 would keep no checkpoint to resume from.
    "train.early_stopping.patience": NON_NEGATIVE_INT,
    "train.early_stopping.min_delta": NON_NEGATIVE,
    "train.ema_decay": UNIT_OPEN_HIGH,
    "train.remat": Choice(_remat_policies),
    "data.views": POSITIVE_INT,
    "pretrain.projection_dim": POSITIVE_INT,
    "pretrain.hidden_dim": POSITIVE_INT,
    "eval.bootstrap_samples": NON_NEGATIVE_INT,
    "eval.target_sensitivity": Range(0, 1, open_low=True),
    "eval.calibration_bins": POSITIVE_INT,
}


def check_values(config: ml_collections.ConfigDict) -> None:
    """Checks every present key of :data:`RULES`, the loss weights, the crop scale and the builder kwargs.

    Raises:
      ConfigError: listing every violation as ``key=value: must be ...``.
    """
    problems = []
    for key, rule in RULES.items():
        found, value = _lookup(config, key)
        if found and (problem := rule.problem(value)) is not None:
            problems.append(f"{key}={value!r}: {problem}")
    for key in METRIC_KEYS if config.get("task", "classification") in _tasks() else ():
        found, value = _lookup(config, key)
        if found and (problem := _metric_problem(config.get("task", "classification"), value)) is not None:
            problems.append(f"{key}={value!r}: {problem}")
    for name, term in dict(config.get("loss") or {}).items():
        weight = dict(term or {}).get("weight")
        if weight is not None and (problem := NON_NEGATIVE.problem(weight)) is not None:
            problems.append(f"loss.{name}.weight={weight!r}: {problem}")
    found, scale = _lookup(config, "data.augment.random_resized_crop_scale")
    if found and scale is not None:
        scale = tuple(scale)
        if (
            len(scale) != 2
            or not all(isinstance(s, int | float) for s in scale)
            or not 0 < scale[0] <= scale[1] <= 1
        ):
            problems.append(
                f"data.augment.random_resized_crop_scale={scale!r}: must be (low, high), 0 < low <= high <= 1"
            )
    found, name = _lookup(config, "data.name")
    if found and name in _datasets():
        problems += _builder_kwargs_problems(name, dict(config.data.get("builder_kwargs") or {}))
    if problems:
        raise ConfigError("Invalid config values:\n" + "\n".join(f"  {p}" for p in problems))


def _builder_kwargs_problems(name: str, kwargs: dict) -> list[str]:
    from medjax.data import builders

    try:
        builders.check_kwargs(name, kwargs)
    except (TypeError, ValueError) as e:
        return [f"data.builder_kwargs ({name}): {e}"]
    return []


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> tuple[bool, Any]:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict | dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _num(x: float) -> str:
    return f"{x:g}"
