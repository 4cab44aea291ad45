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
* nothing for the commands that use a run's predictions (predict, Grad-CAM, export, evaluate): they
  refuse its run directory (:func:`after_training_error`); a pretraining run is judged by fine-tuning
  from it.
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


def after_training_error(workdir: Path, config: ml_collections.ConfigDict) -> MedjaxError:
    """What the commands that use a run's predictions say about a pretraining run: it holds a backbone
    and the objectives' heads, no trained classifier, and what to do with it is fine-tune from it."""
    methods = [
        f"distillation from {config.loss.distillation.teacher}" if name == "distillation" else name
        for name in pretraining.OBJECTIVES
        if name in config.loss
    ]
    return MedjaxError(
        f"{workdir} is a pretraining run (task 'pretrain', {' + '.join(methods) or 'no objective'}): its "
        f"checkpoint holds a {config.model_name} backbone trained on images alone and no trained "
        "classifier, so there is nothing to predict, explain, export or evaluate. Fine-tune a classifier "
        f"from it with --config.init_from.path={workdir} in a classification config that builds the same "
        f"model ({config.model_name} with the run's model settings, {config.data.channels} channel(s)), "
        "then use that run; e.g. for a reduced CPU student at 64 px grey (configs/pretrain.py's default):\n"
        f"  python -m medjax.launch --config=configs/chest_xray.py:variant=scratch,model={config.model_name} "
        f"--config.data.manual_dir=<labelled images> --config.init_from.path={workdir} --workdir=<new run>"
    )
