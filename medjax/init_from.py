"""``config.init_from``: the weights a fresh run starts from instead of its random initialisation.

Two kinds of source: a pretrained weights file (Keras, PyTorch, safetensors, quantized MobileNetV2
TFLite; mapped by :func:`medjax.models.convert.load_pretrained`), or a medjax run directory, whose best
checkpoint starts a fine-tuning run on another dataset. A resumed run restores its own checkpoint over
these, so the source is read, not trusted, after the first start.

A weights file's BatchNorm statistics can be re-measured on the task's training images
(``init_from.calibrate_images``, :mod:`medjax.models.convert.calibrate`); a ``.tflite`` start needs it,
since its folded BatchNorms hold no statistics and the training pass would not compute the pretrained
network (:mod:`medjax.models.convert.tflite`).
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from flax import traverse_util

from medjax import pretraining, run_dir
from medjax.data import pipeline
from medjax.errors import ConfigError, MedjaxError
from medjax.models import convert
from medjax.models.convert import calibrate

# Images whose statistics replace the identity BatchNorms of a folded (.tflite) start: per-channel
# moments over 256 images x H x W positions are stable, for the cost of one evaluation pass over them.
TFLITE_CALIBRATION_IMAGES = 256


def initial_variables(
    config: ml_collections.ConfigDict, model: nn.Module, fresh: dict, image_shape: tuple[int, int, int]
) -> dict:
    """``fresh`` (randomly initialised variables), overwritten by ``config.init_from`` when it is set.

    Raises:
      ConfigError: for an ``init_from.path`` that does not exist, or a weights-file ``source`` given
        for a run directory.
    """
    if not config.init_from.path:
        return fresh
    if isinstance(model, pretraining.Pretrainer):
        # Self-supervision continued from a pretrained network (Self-Trans: ImageNet, then the target
        # images): the source starts the student; the objectives' heads keep their fresh values.
        started = initial_variables(config, model.student, pretraining.student_variables(fresh), image_shape)
        variables = {collection: dict(tree) for collection, tree in fresh.items()}
        for collection, tree in started.items():
            if tree:
                variables[collection]["student"] = tree
        return variables
    path = Path(config.init_from.path).expanduser()
    if not path.exists():
        raise ConfigError(
            f"init_from.path {path} does not exist. Give a weights file (.weights.h5, .keras, .h5, .pth, "
            ".safetensors, .tflite) or a medjax run directory (with config.json and checkpoints/), or "
            "unset it."
        )
    if path.is_dir() and run_dir.RunDir(path).is_run():
        if config.init_from.source is not None:
            raise ConfigError("init_from.source names a weights file's scheme; unset it for a run directory.")
        return from_run(
            path,
            model=model,
            model_name=config.model_name,
            target_variables=fresh,
            image_shape=image_shape,
            reinit_head=config.init_from.reinit_head,
        )
    variables = convert.load_pretrained(
        str(path),
        model_name=config.model_name,
        target_variables=fresh,
        source=config.init_from.source,
        reinit_head=config.init_from.reinit_head,
        model=model,
    )
    num_images = config.init_from.calibrate_images
    if num_images is None:
        num_images = TFLITE_CALIBRATION_IMAGES if path.suffix.lower() == ".tflite" else 0
    if num_images > 0:
        batches = list(first_images(config.data, num_images))
        count = sum(len(b) for b in batches)
        print(f"Calibrating BatchNorm statistics on {count} {config.data.train_split} images.", flush=True)
        variables = calibrate.calibrate_batch_norm(model, variables, batches)
    return variables


def first_images(data_cfg: ml_collections.ConfigDict, num_images: int) -> Iterator[np.ndarray]:
    """Batches of the first ``num_images`` (rounded up to whole batches) images of the training split,
    with the evaluation preprocessing (TFDS stores a split shuffled); the split's padding is dropped.
    A pretraining run's augmented views (``data.views`` > 1) are not read: one plain view per image."""
    if data_cfg.get("views", 1) > 1:
        data_cfg = data_cfg.copy_and_resolve_references()
        data_cfg.views = 1
    with contextlib.closing(pipeline.iterate_eval(data_cfg, split=data_cfg.train_split)) as batches:
        seen = 0
        for batch in batches:
            if seen >= num_images:
                return
            images = batch["image"][np.asarray(batch["mask"], bool)]
            seen += len(images)
            yield images


def from_run(
    workdir: str | Path,
    *,
    model: nn.Module,
    model_name: str,
    target_variables: dict,
    image_shape: tuple[int, int, int],
    reinit_head: bool | None,
) -> dict:
    """A previous run's best weights as the start of a new run: fine-tuning on another dataset.

    The run must have the same architecture (``model_name`` and model config) up to its class count. Its
    output layer (the parameters whose shapes depend on the class count) keeps the fresh values of
    ``target_variables`` when ``reinit_head`` is True, or when None and the class counts differ; with
    False it is copied like every other array. A pretraining run (:mod:`medjax.tasks.pretrain`) gives
    its student's weights, and the output layer always starts fresh (it never trained).

    Raises:
      MedjaxError: naming the run and listing every missing, unexpected and mis-shaped array.
    """
    source = run_dir.load_run(workdir, predicts=False)
    if source.config.model_name != model_name:
        raise MedjaxError(
            f"init_from.path {workdir} is a run of {source.config.model_name!r}, but this config trains "
            f"{model_name!r}. Use the run's model_name and model settings (its config.json), or another run."
        )
    heads = output_layers(model, image_shape)
    source_variables = source.variables
    pretrained = source.config.task == "pretrain"
    if pretrained:
        # Its backbone learnt from images alone; its classifier never trained, so it always starts fresh.
        source_variables = pretraining.student_variables(source_variables)
    fresh_head = (
        reinit_head or pretrained or (reinit_head is None and len(source.class_names) != model.num_classes)
    )
    found = traverse_util.flatten_dict(source_variables)
    out, problems = {}, []
    for path, value in traverse_util.flatten_dict(target_variables).items():
        array = found.pop(path, None)
        if fresh_head and path[1] in heads:
            out[path] = value
        elif array is None:
            problems.append(f"missing from the run: {'/'.join(path)} {value.shape}")
        elif array.shape != value.shape:
            problems.append(f"mis-shaped: {'/'.join(path)}: run {array.shape}, model {value.shape}")
        else:
            out[path] = jnp.asarray(array, value.dtype)
    problems += [f"unexpected (only in the run): {'/'.join(path)}" for path in found]
    if problems:
        shown = problems[:10] + [f"... and {len(problems) - 10} more"] * (len(problems) > 10)
        raise MedjaxError(
            f"The best checkpoint of {workdir} does not fit this {model_name} ({len(problems)} array(s)):\n  "
            + "\n  ".join(shown)
            + "\nSet config.model to the run's model settings (its config.json), or "
            "init_from.reinit_head=True for another class count."
        )
    kept = f"; output layer {sorted(heads)} re-initialised" if fresh_head else ""
    what = "pretraining run" if pretrained else "run"
    print(
        f"Initialised {model_name} from {what} {workdir} (best checkpoint, step {source.step}, classes "
        f"{list(source.class_names)}){kept}.",
        flush=True,
    )
    return traverse_util.unflatten_dict(out)


def output_layers(model: nn.Module, image_shape: tuple[int, int, int]) -> set[str]:
    """Top-level modules whose parameter shapes change with the class count: the classifier layer."""

    def shapes(num_classes: int) -> dict:
        abstract = run_dir.abstract_variables(model.clone(num_classes=num_classes), image_shape)
        return traverse_util.flatten_dict(abstract["params"])

    a, b = shapes(model.num_classes), shapes(model.num_classes + 1)
    return {path[0] for path in a if a[path].shape != b[path].shape}
