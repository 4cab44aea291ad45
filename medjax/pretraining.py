"""Pretraining objectives for a classifier's backbone on unlabelled images: SimSiam and distillation.

:class:`Pretrainer` wraps the classification model a config names (the *student*) with the heads an
objective needs; the student sits under the ``student`` key of the variables, so
:func:`student_variables` hands its backbone to a fine-tuning run (:func:`medjax.init_from.from_run`).
The objectives are loss terms on the ordinary train step (:mod:`medjax.tasks.pretrain`):

``simsiam`` (Chen & He 2021, "Exploring Simple Siamese Representation Learning")
    Two augmented views of each image; a predictor MLP maps one view's projection onto the other's, whose
    projection is a stop-gradient target: ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``. Chosen over the
    alternatives for ConvNets on a CPU budget: it needs no negatives (SimCLR/MoCo need large batches or a
    queue; here batches are 16-64 images), no momentum encoder (BYOL keeps a second copy of the weights
    and updates it every step), and no masking machinery (FCMAE/SparK need sparse convolutions to be
    cheap; dense masked ConvNeXt pays for the masked pixels too). Its collapse risk is watched by the
    validation metric ``feature_std`` (the spread of L2-normalised features, ~1 healthy, 0 collapsed).
``distillation``
    The student's features, through a small projection MLP, match a frozen teacher's pooled embedding
    of the same augmented view (cosine distance, or mean squared error). The teacher is the ImageNet
    MobileNetV2 ``.tflite`` (1280-d), or any medjax run directory (e.g. a classifier fine-tuned on the
    labelled part of an archive). Its variables are the term's state (:class:`medjax.losses.StatefulTerm`):
    an argument of the jitted step, never differentiated and never updated by the optimizer.

Views: ``data.views`` augmented views per image reach the model as ``(B, V, H, W, C)``
(:mod:`medjax.data.pipeline`); a 4-D batch is one view.
"""

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax import losses, run_dir
from medjax.errors import ConfigError

OBJECTIVES = ("simsiam", "distillation")
DISTANCES = ("cosine", "mse")
# ImageNet MobileNetV2 as converted from the .tflite (medjax.recipes.imagenet_mobilenet_v2): Keras padding
# and BatchNorm epsilon, 1001 ImageNet outputs, pixels in [-1, 1].
TFLITE_TEACHER = {"num_classes": 1001, "width_multiplier": 1.0, "padding_style": "tf", "bn_epsilon": 1e-3}


class MLP(nn.Module):
    """Dense layers with BatchNorm and ReLU between them (SimSiam's heads); ``final_norm`` adds a
    BatchNorm without scale and offset after the last layer (SimSiam's projector output)."""

    widths: tuple[int, ...]
    final_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        for width in self.widths[:-1]:
            x = nn.relu(norm()(nn.Dense(width)(x)))
        x = nn.Dense(self.widths[-1])(x)
        return norm(use_scale=False, use_bias=False)(x) if self.final_norm else x


class Pretrainer(nn.Module):
    """The student classifier plus the heads of ``objectives``; returns ``(outputs, aux)``.

    ``outputs[objective]`` is ``(B, V, D)``: SimSiam's predictions, or distillation's projections of
    the teacher's width ``projection_dim``. ``aux`` holds the student's ``features`` ``(B, V, F)``,
    SimSiam's ``projection`` targets ``(B, V, D)`` and ``pixels`` ``(B, V, H, W, C)``, the views with
    the normalisation undone (``[0, 1]``, what a teacher re-normalises its own way).

    Attributes:
      student: the classification model whose backbone is pretrained (its classifier is left untrained).
      objectives: names among :data:`OBJECTIVES`.
      projection_dim: output width of the heads (distillation: the teacher's feature width).
      hidden_dim: hidden width of the projector and distillation MLPs (SimSiam's predictor uses a
        quarter of ``projection_dim``, the paper's bottleneck).
      pixel_mean, pixel_std: ``data.normalize`` of the input, per channel or scalar.
    """

    student: nn.Module
    objectives: tuple[str, ...]
    projection_dim: int = 256
    hidden_dim: int = 1024
    pixel_mean: tuple[float, ...] = (0.0,)
    pixel_std: tuple[float, ...] = (1.0,)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> tuple[dict, dict]:
        views = images if images.ndim == 5 else images[:, None]
        b, v = views.shape[:2]
        _, student_aux = self.student(views.reshape(b * v, *views.shape[2:]), train=train)
        features = student_aux["features"]
        outputs, aux = {}, {"features": features.reshape(b, v, -1)}
        if "simsiam" in self.objectives:
            widths = (self.hidden_dim, self.hidden_dim, self.projection_dim)
            z = MLP(widths, final_norm=True, name="projector")(features, train=train)
            p = MLP((self.projection_dim // 4, self.projection_dim), name="predictor")(z, train=train)
            outputs["simsiam"], aux["projection"] = p.reshape(b, v, -1), z.reshape(b, v, -1)
        if "distillation" in self.objectives:
            q = MLP((self.hidden_dim, self.projection_dim), name="distill_head")(features, train=train)
            outputs["distillation"] = q.reshape(b, v, -1)
        mean, std = jnp.asarray(self.pixel_mean), jnp.asarray(self.pixel_std)
        aux["pixels"] = jax.lax.stop_gradient(views * std + mean)
        return outputs, aux


def student_variables(variables: Mapping) -> dict:
    """The student's ``{'params', 'batch_stats'}`` out of a :class:`Pretrainer`'s variables."""
    return {collection: dict(tree).get("student", {}) for collection, tree in variables.items()}


def _unit(x: jax.Array) -> jax.Array:
    """``x / |x|`` along the last axis; a zero vector stays zero, with a finite gradient (that of
    ``jnp.linalg.norm`` is NaN at 0, and a row of dead ReLUs before a zero bias is exactly 0)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity along the last axis (0 for a zero vector)."""
    return jnp.sum(_unit(a) * _unit(b), axis=-1)


def simsiam(*, logits: Mapping, labels: jax.Array, aux: Mapping, reduction: bool = True) -> jax.Array:
    """SimSiam's symmetric negative cosine, per image in [-1, 1]; the targets ``aux['projection']`` are
    stop-gradient, so each view's predictor is pulled towards the other view and never the reverse."""
    del labels
    p = logits["simsiam"].astype(jnp.float32)
    z = jax.lax.stop_gradient(aux["projection"]).astype(jnp.float32)
    if p.shape[1] != 2:
        views = p.shape[1]
        raise ConfigError(f"loss.simsiam compares two views of each image: set data.views=2, not {views}.")
    per_example = -0.5 * (_cosine(p[:, 0], z[:, 1]) + _cosine(p[:, 1], z[:, 0]))
    return jnp.mean(per_example) if reduction else per_example


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen network and how it wants its input: ``[0, 1]`` pixels -> ``(x - mean) / std`` with
    ``channels`` channels (grey views are repeated to 3; RGB views averaged to 1)."""

    model: nn.Module
    variables: dict
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int

    def features(self, variables: Mapping, pixels: jax.Array, image_size: int | None) -> jax.Array:
        """Pooled embeddings ``(N, D)`` of ``(N, H, W, C)`` pixels in ``[0, 1]``, without gradient."""
        if pixels.shape[-1] != self.channels:
            pixels = jnp.repeat(pixels, 3, -1) if self.channels == 3 else pixels.mean(-1, keepdims=True)
        if image_size and pixels.shape[1:3] != (image_size, image_size):
            shape = (pixels.shape[0], image_size, image_size, self.channels)
            pixels = jax.image.resize(pixels, shape, "linear")
        x = (pixels - jnp.asarray(self.mean)) / jnp.asarray(self.std)
        _, aux = self.model.apply(variables, x, train=False)
        return jax.lax.stop_gradient(aux["features"].astype(jnp.float32))


@functools.lru_cache(maxsize=2)
def load_teacher(path: str) -> Teacher:
    """The teacher at ``path``, read once per process: the ImageNet MobileNetV2 ``.tflite`` or a medjax
    run directory (its best checkpoint and its own input normalisation).

    Raises:
      ConfigError: for a path that does not exist or is neither, naming what is accepted.
    """
    from medjax import models, recipes, train_step  # Late: they import the tasks, which import this module.
    from medjax.models import convert

    location = Path(path).expanduser()
    if location.is_dir() and run_dir.RunDir(location).is_run():
        run = run_dir.load_run(location, predicts=False)
        normalize = run.config.data.normalize
        return Teacher(
            model=run.model,
            variables=run.variables,
            mean=tuple(np.atleast_1d(np.asarray(normalize.mean, np.float32)).tolist()),
            std=tuple(np.atleast_1d(np.asarray(normalize.std, np.float32)).tolist()),
            channels=run.config.data.channels,
        )
    if location.suffix.lower() != ".tflite" or not location.is_file():
        problem = "is neither a .tflite file nor a medjax run directory"
        file = recipes.IMAGENET_MOBILENET_V2_FILE
        raise ConfigError(
            f"loss.distillation.teacher={path!r} {problem if location.exists() else 'does not exist'}. Give "
            f"the ImageNet MobileNetV2 ({file} under the weights folder, e.g. --config.loss.distillation."
            f"teacher=../shared/weights/{file}) or the --workdir of a finished run."
        )
    model = models.get_model("mobilenet_v2", **TFLITE_TEACHER)
    fresh = train_step.init_variables(model, rng=jax.random.key(0), image_shape=(32, 32, 3))
    variables = convert.load_pretrained(
        str(location), model_name="mobilenet_v2", target_variables=fresh, reinit_head=False, model=model
    )
    # Evaluation mode computes exactly the file's network (its folded BatchNorms are identities).
    return Teacher(model=model, variables=variables, mean=(0.5,), std=(0.5,), channels=3)


def init_teacher(*, num_classes: int, feature_dim: int, teacher: str, **params) -> dict:
    """The distillation term's state: a copy of the teacher's variables (the train step donates its state,
    which would delete the arrays :func:`load_teacher` keeps cached for the process's next run)."""
    del num_classes, feature_dim, params
    return jax.tree.map(jnp.array, load_teacher(teacher).variables)


def keep_teacher(state: dict, **kwargs) -> dict:
    """The teacher is frozen: its state after a step is the state before."""
    del kwargs
    return state


def feature_distance(q: jax.Array, target: jax.Array, distance: str) -> jax.Array:
    """Distance along the last axis: ``1 - cos(q, target)`` ('cosine', scale-free: the projection learns
    the teacher's direction) or the mean squared difference ('mse', also its magnitudes).

    Raises:
      ConfigError: for another ``distance``.
    """
    if distance == "cosine":
        return 1.0 - _cosine(q, target)
    if distance == "mse":
        return jnp.mean((q - target) ** 2, axis=-1)
    raise ConfigError(f"loss.distillation.distance={distance!r}: must be one of {DISTANCES}.")


def distillation(
    *,
    logits: Mapping,
    labels: jax.Array,
    aux: Mapping,
    state: dict,
    teacher: str,
    distance: str = "cosine",
    teacher_image_size: int | None = None,
    reduction: bool = True,
) -> jax.Array:
    """Distance of the student's projections to the teacher's embeddings of the same views, per image
    (mean over views): ``1 - cos`` for ``'cosine'``, the mean squared difference for ``'mse'``.

    ``teacher_image_size`` resizes the views for the teacher (None: as the student sees them).
    """
    del labels
    q = logits["distillation"].astype(jnp.float32)
    b, v = q.shape[:2]
    pixels = aux["pixels"]
    views = pixels.reshape(b * v, *pixels.shape[2:])
    target = load_teacher(teacher).features(state, views, teacher_image_size)
    if target.shape[-1] != q.shape[-1]:
        raise ConfigError(
            f"The teacher's features have {target.shape[-1]} dimensions but pretrain.projection_dim is "
            f"{q.shape[-1]}: set --config.pretrain.projection_dim={target.shape[-1]}."
        )
    per_example = feature_distance(q, target.reshape(b, v, -1), distance).mean(axis=1)
    return jnp.mean(per_example) if reduction else per_example


LOSS_TERMS = {
    "simsiam": simsiam,
    "distillation": losses.StatefulTerm(loss=distillation, init=init_teacher, update=keep_teacher),
}
