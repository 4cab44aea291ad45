"""The run directory: the one interface between training and everything that reads a run afterwards.

:func:`medjax.train.train_and_evaluate` writes a run directory; evaluation, Grad-CAM, prediction, export,
fine-tuning (``init_from``) and the scripts in ``launch/`` read one. This module owns its layout, so a
file name is spelt here and nowhere else:

==========================  =============================================================================
``config.json``             the full resolved config
``dataset.json``            class names and per-split label counts (inference needs no dataset)
``metrics.jsonl``           one JSON line per log step and evaluation
``tensorboard/``            the same scalars as TensorBoard event files
``checkpoints/latest/N/``   Orbax: train state, data iterator, loop state (to resume)
``checkpoints/best/N/``     Orbax: variables of the best validation evaluation (to use)
``report.json``             validation and test metrics of the best checkpoint, written at the end
``evaluation/``             ``python -m medjax.evaluate``'s report
``.medjax.lock``            held while a run trains here; names its pid, host and command
``gradcam/``, ``export/``   ``python -m medjax.gradcam`` and ``python -m medjax.export`` outputs
==========================  =============================================================================

:func:`load_run` restores a run's best checkpoint with its model and class names as a
:class:`TrainedModel`.
"""

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from medjax import inference, metrics, models, sliding_window, tasks
from medjax.checkpointing import RunCheckpointer
from medjax.data import transforms
from medjax.errors import ConfigError, MedjaxError


def report_paths(directory: str | Path) -> tuple[Path, Path]:
    """``(report.json, report.md)`` in ``directory``: a run's final report (JSON only) and an evaluation's."""
    directory = Path(directory)
    return directory / "report.json", directory / "report.md"


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Paths and small files of one run directory (nothing is created until written)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    config_file = property(lambda self: self.path / "config.json")
    dataset_file = property(lambda self: self.path / "dataset.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    tensorboard_dir = property(lambda self: self.path / "tensorboard")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")
    report_file = property(lambda self: report_paths(self.path)[0])
    evaluation_dir = property(lambda self: self.path / "evaluation")
    gradcam_dir = property(lambda self: self.path / "gradcam")
    export_dir = property(lambda self: self.path / "export")
    lock_file = property(lambda self: self.path / ".medjax.lock")  # Held by training (medjax.locking).

    def is_run(self) -> bool:
        """Whether training ever started here (it writes ``config.json`` first)."""
        return self.config_file.is_file()

    def read_config(self) -> ml_collections.ConfigDict:
        """The config the run was trained with.

        Raises:
          MedjaxError: when the directory is not a run directory.
        """
        if not self.is_run():
            raise MedjaxError(
                f"{self.config_file} not found: {self.path} is not a medjax run directory. Pass the "
                "--workdir of a run started with `python -m medjax.launch` (it holds config.json, "
                "dataset.json and checkpoints/)."
            )
        from medjax import config_lib

        return config_lib.with_defaults(json.loads(self.config_file.read_text()))

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        from medjax import config_lib  # config_lib imports the models and tasks; keep this module light.

        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(config_lib.to_json(config))

    def read_dataset_info(self) -> dict:
        """``{'class_names': [...], 'label_counts': {split: [...]}}``."""
        if not self.dataset_file.is_file():
            raise MedjaxError(
                f"{self.dataset_file} not found: it is written when training starts; rerun the run once."
            )
        return json.loads(self.dataset_file.read_text())

    def write_dataset_info(self, *, class_names: Sequence[str], label_counts: dict) -> None:
        """Records what a trained run needs to know about its data, so inference does not need the data."""
        info = {
            "class_names": list(class_names),
            "label_counts": {k: list(v) for k, v in label_counts.items()},
        }
        self.dataset_file.write_text(json.dumps(info, indent=2))

    def read_report(self) -> dict | None:
        """The final training report, or None for a run that has not finished."""
        return json.loads(self.report_file.read_text()) if self.report_file.is_file() else None

    def write_report(self, report: dict) -> None:
        self.report_file.write_text(json.dumps(report, indent=2, default=float))

    def finished_report(self, config: ml_collections.ConfigDict) -> dict | None:
        """The final report of a run that finished with ``config``; None if it has not finished.

        For scripts that train many runs and reuse those already done (``launch/``).

        Raises:
          ConfigError: when the run finished with another config, listing the keys that differ (its
            numbers must not be reported as this config's).
        """
        report = self.read_report()
        if report is None:
            return None
        from medjax import config_lib

        differing = config_lib.differing_keys(self.read_config().to_dict(), config.to_dict())
        if differing:
            raise ConfigError(
                f"{self.path} holds a finished run of another config (keys {', '.join(differing)}); "
                "use another directory or delete it to rerun."
            )
        return report

    def checkpointer(self, config: ml_collections.ConfigDict) -> RunCheckpointer:
        """The run's checkpoint series, set up as training set it up (best by ``train.select_best_on``)."""
        best_on = config.train.select_best_on
        return RunCheckpointer(
            self.checkpoint_dir,
            keep=config.train.keep_checkpoints,
            best_metric=best_on,
            best_mode="min" if best_on == "loss" else "max",
        )


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A model with its trained variables and everything needed to feed it images.

    Attributes:
      config: the run's config (as written to ``config.json``).
      model: the Flax module, built as the run built it.
      variables: ``{'params', 'batch_stats'}`` of the best checkpoint.
      class_names: label names, index = label id.
      step: training step of the restored checkpoint.
      workdir: the run directory it came from.
    """

    config: ml_collections.ConfigDict
    model: nn.Module
    variables: dict
    class_names: tuple[str, ...]
    step: int
    workdir: Path

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.workdir)

    @property
    def task(self) -> Any:
        """The run's task module (:mod:`medjax.tasks`)."""
        return tasks.get_task(self.config.task)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        data = self.config.data
        return (data.image_size, data.image_size, data.channels)

    @functools.cached_property
    def _eval_transforms(self) -> list:
        return transforms.build_eval_transforms(self.config.data)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """A decoded ``(H, W, 1 or 3)`` uint8 image -> the float32 model input of the run's evaluation."""
        element = {"image": image}
        for transform in self._eval_transforms:
            element = transform.map(element)
        return element["image"]

    def apply(self, images: jax.Array) -> tuple[jax.Array, dict]:
        """``(logits, aux)`` in inference mode for a batch of preprocessed images."""
        return self.model.apply(self.variables, images, train=False)

    @functools.cached_property
    def logits_fn(self) -> Callable[[dict, jax.Array], jax.Array]:
        """Jitted ``(variables, images) -> logits`` in inference mode (variables are an argument, not
        constants baked into the compiled program)."""
        return jax.jit(lambda variables, images: self.model.apply(variables, images, train=False)[0])

    @functools.cached_property
    def outputs_fn(self) -> Callable[[dict, dict], dict]:
        """Jitted ``(variables, batch) -> the task's per-example eval outputs`` (e.g. logits) of an
        evaluation batch (``image`` plus what the task reads beside it, e.g. a segmentation's ``valid``)."""
        return jax.jit(
            lambda variables, batch: self.task.eval_outputs(
                *self.model.apply(variables, batch["image"], train=False), batch
            )
        )

    def predict_proba(self, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Class probabilities ``(N, K)`` of preprocessed images, in batches of ``batch_size``.

        The last batch is padded to the full size, so every call compiles once per batch size. The
        softmax runs on the host in float64 (:func:`medjax.metrics.probabilities`).
        """
        if len(images) == 0:
            return np.zeros((0, len(self.class_names)))
        (logits,) = inference.map_batches(
            lambda x: (self.logits_fn(self.variables, x),),
            np.asarray(images, np.float32),
            batch_size=batch_size,
        )
        return metrics.probabilities(logits)


def abstract_variables(model: nn.Module, image_shape: tuple[int, ...]) -> dict:
    """Shapes of ``model``'s ``{'params', 'batch_stats'}`` (as saved), without computing anything."""
    keys = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
    shapes = jax.eval_shape(lambda: model.init(keys, jnp.zeros((1, *image_shape)), train=False))
    return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}


def load_run(workdir: str | Path, *, predicts: bool = True) -> TrainedModel:
    """Restores the best-on-validation checkpoint of a run directory.

    ``predicts`` says the caller uses the model's predictions (predict, Grad-CAM, export, evaluate): a
    run of a task that predicts nothing (pretraining) is then refused before anything is loaded. Readers
    of its weights or features (``init_from``, a distillation teacher) pass False.

    Raises:
      MedjaxError: naming the missing file or checkpoint and what produces it, or, with ``predicts``,
        saying that the run predicts nothing and what to do with it (:func:`medjax.tasks.check_predicts`).
    """
    run = RunDir(workdir)
    config = run.read_config()
    task = tasks.get_task(config.task)
    if predicts:
        tasks.check_predicts(task, run.path, config)
    class_names = tuple(run.read_dataset_info()["class_names"])
    model = sliding_window.wrap(
        models.get_model(config.model_name, num_classes=len(class_names), **config.model), config
    )
    model = tasks.training_model(task, model, config)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    ckpt = run.checkpointer(config)
    try:
        step = ckpt.best_step()
        if step is None:
            raise MedjaxError(
                f"No best checkpoint in {run.checkpoint_dir / 'best'}: the run has not reached its "
                "first evaluation. Resume it with the same --workdir until it evaluates."
            )
        variables = ckpt.restore_best(abstract_variables=abstract_variables(model, image_shape))
    finally:
        ckpt.close()
    return TrainedModel(
        config=config,
        model=model,
        variables=jax.device_get(variables),
        class_names=class_names,
        step=int(step),
        workdir=run.path,
    )
