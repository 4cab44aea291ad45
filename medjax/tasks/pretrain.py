"""Pretraining: a classifier's backbone learns from images alone (labels, if the dataset has any, are
ignored), and a later classification run starts from it (``init_from.path``).

What this task owns (the interface is in :mod:`medjax.tasks`; the objectives in
:mod:`medjax.pretraining`):

* the model: the config's classifier (``model_name``, ``model``) wrapped in a
  :class:`medjax.pretraining.Pretrainer` with the heads of the configured objectives
  (``config.pretrain``), so the run directory's best checkpoint holds the student under ``student``;
* training: ``loss.simsiam`` (two views, ``data.views=2``) and/or ``loss.distillation`` (a frozen
  teacher), read from any classification dataset's images;
* validation: the objective's loss on the validation split (SimSiam's views are augmented with a fixed
  seed, so every evaluation compares the same pairs) and ``feature_std``, the per-dimension standard
  deviation of the L2-normalised student features times ``sqrt(F)``: at most 1 (features spread evenly
  over the sphere), 0 when they collapse to one point (SimSiam's failure mode);
* nothing for ``python -m medjax.evaluate``: a pretraining run is judged by fine-tuning from it.
"""

from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from medjax import pretraining
from medjax.errors import ConfigError, MedjaxError

# The datasets it reads: images with (ignored) labels.
DATASET_TASK = "classification"
LOSS_TERMS = pretraining.LOSS_TERMS


def default_loss() -> dict:
    return {"simsiam": {"weight": 1.0}}


def training_model(student: nn.Module, config: ml_collections.ConfigDict) -> nn.Module:
    """``student`` with the heads of the objectives in ``config.loss``.

    Raises:
      ConfigError: for a loss without any pretraining objective.
    """
    objectives = tuple(name for name in pretraining.OBJECTIVES if name in config.loss)
    if not objectives:
        raise ConfigError(
            f"A pretraining config needs loss.simsiam and/or loss.distillation; got {sorted(config.loss)}."
        )

    def per_channel(value) -> tuple[float, ...]:
        return tuple(float(x) for x in np.atleast_1d(np.asarray(value, np.float32)))

    return pretraining.Pretrainer(
        student=student,
        objectives=objectives,
        projection_dim=config.pretrain.projection_dim,
        hidden_dim=config.pretrain.hidden_dim,
        pixel_mean=per_channel(config.data.normalize.mean),
        pixel_std=per_channel(config.data.normalize.std),
    )


def step_metrics(logits: dict, batch: dict) -> dict[str, jax.Array]:
    del logits, batch  # The loss terms are the training signal, and they are logged already.
    return {}


def eval_outputs(logits: dict, aux: dict, batch: dict) -> dict[str, jax.Array]:
    del logits, batch
    return {"features": aux["features"][:, 0]}


# The objective's loss and the collapse signal (see the module docstring): what a run may select on.
VALIDATION_METRICS = ("loss", "feature_std")


def validation_metrics(predictions: dict, class_names: Sequence[str]) -> dict:
    """``feature_std`` of the gathered student features (see the module docstring)."""
    del class_names
    f = np.asarray(predictions["features"], np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    return {"feature_std": float(np.mean(np.std(f, axis=0)) * np.sqrt(f.shape[-1]))}


def headline(m: dict) -> str:
    return f"feature_std {m['feature_std']:.4f}"


def _not_evaluated(*args, **kwargs):
    raise MedjaxError(
        "A pretraining run has no predictions to evaluate: fine-tune a classifier from it "
        "(--config.init_from.path=<this run>) and evaluate that run."
    )


def ensemble(member_predictions: Sequence[dict]) -> dict:
    return _not_evaluated(member_predictions)


def judge(predictions: dict[str, dict], *, out: Path, class_names: Sequence[str], settings: dict) -> dict:
    return _not_evaluated(predictions, out, class_names, settings)


def report_lines(report: dict) -> list[str]:
    return _not_evaluated(report)
