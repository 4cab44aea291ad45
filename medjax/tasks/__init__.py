"""Tasks: what differs between classification and other kinds of output, behind one small interface.

The train step, checkpointing, the data pipeline, the inference pass (:mod:`medjax.inference`) and the
command-line programs are the same for every task; ``config.task`` names a module of this package that
owns the rest. Each task module provides:

``default_loss()``
    the ``config.loss`` a config starts from (:func:`medjax.config_lib.base_config`).
``step_metrics(logits, batch)``
    jnp scalars logged beside the loss at every training step (e.g. accuracy).
``eval_outputs(logits, aux, batch)``
    what the inference pass keeps per example (e.g. the logits; a segmentation also keeps the batch's
    ``valid`` map, small enough to hold for a whole split).
``validation_metrics(predictions, class_names)``
    the metrics of one split's gathered predictions (``label`` plus the ``eval_outputs``), as the
    training loop logs, selects the best checkpoint on and reports; ``headline(metrics)`` is their
    one-line console summary. ``VALIDATION_METRICS`` names those scalars (with ``loss``), and an optional
    ``PER_CLASS_METRICS`` the prefixes of per-class ones (``dice_<class>``): the config check accepts
    exactly these for ``train.select_best_on`` and ``train.early_stopping.monitor``.
``ensemble(member_predictions)``
    one prediction from several runs' predictions of the same examples.
``judge(predictions, *, out, class_names, settings)`` and ``report_lines(report)``
    what ``python -m medjax.evaluate`` computes, draws and writes for a split set.

Optional, for a task that trains differently from what it reads (pretraining):

``DATASET_TASK``
    the kind of dataset it reads (default: its own name), e.g. ``'classification'``.
``LOSS_TERMS``
    loss terms by name beyond :data:`medjax.losses.TERMS`.
``training_model(model, config)``
    the module that trains, wrapping the config's model (default: the model itself); a run directory
    stores its variables, and :func:`medjax.run_dir.load_run` rebuilds it the same way.
``after_training_error(workdir, config)``
    for a task whose runs predict nothing: the :class:`~medjax.errors.MedjaxError` that the commands
    using a run's predictions (predict, Grad-CAM, export, evaluate) raise for one of its run
    directories, saying what to do with it instead (:func:`check_predicts`). Such a task needs no
    ``ensemble``, ``judge`` or ``report_lines``.

Tasks are modules rather than classes, loaded by name like models (:mod:`medjax.models`).
"""

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

import ml_collections
from flax import linen as nn

from medjax.errors import ConfigError


def available_tasks() -> list[str]:
    """Names accepted by :func:`get_task`."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_task(name: str) -> ModuleType:
    """The task module ``medjax.tasks.<name>``.

    Raises:
      ConfigError: for an unknown name, listing the available ones.
    """
    names = available_tasks()
    if name not in names:
        raise ConfigError(f"Unknown task {name!r} (config.task); available: {', '.join(names)}.")
    return importlib.import_module(f"medjax.tasks.{name}")


def dataset_task(task: ModuleType) -> str:
    """The kind of dataset ``task`` reads (its ``DATASET_TASK``, else its own name)."""
    return getattr(task, "DATASET_TASK", task.__name__.rsplit(".", 1)[-1])


def loss_terms(task: ModuleType) -> dict:
    """The loss terms ``task`` adds to :data:`medjax.losses.TERMS` (``{}`` for most tasks)."""
    return dict(getattr(task, "LOSS_TERMS", {}))


def training_model(task: ModuleType, model: nn.Module, config: ml_collections.ConfigDict) -> nn.Module:
    """The module a run of ``task`` trains: ``model`` wrapped by the task's ``training_model``, if any."""
    wrap = getattr(task, "training_model", None)
    return model if wrap is None else wrap(model, config)


def check_predicts(task: ModuleType, workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Raises ``task``'s ``after_training_error`` for the run in ``workdir``, if it has one: the one
    check between a run that predicts nothing (pretraining) and the commands that use predictions."""
    refuse = getattr(task, "after_training_error", None)
    if refuse is not None:
        raise refuse(workdir, config)
