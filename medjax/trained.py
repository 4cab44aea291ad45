"""A trained run, loaded back from its workdir: config, model, best variables and class names.

Evaluation, Grad-CAM, prediction on new files and export all start from a finished (or interrupted)
run directory rather than from a live training loop, so they share this one loader. It reads
``config.json`` and ``dataset.json`` written by :func:`medjax.train.train_and_evaluate` and restores the
best-on-validation Orbax checkpoint, so it needs neither the training data nor the config file that
started the run.
"""

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from flax import traverse_util

from medjax import metrics, models
from medjax.checkpointing import RunCheckpointer
from medjax.data import transforms
from medjax.errors import MedjaxError

DATASET_FILE = "dataset.json"


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

    def predict_proba(self, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Class probabilities ``(N, K)`` of preprocessed images, in batches of ``batch_size``.

        The last batch is padded to the full size, so every call compiles once per batch size. The
        softmax runs on the host in float64 (:func:`medjax.metrics.probabilities`).
        """
        logits = []
        for i in range(0, len(images), batch_size):
            chunk = np.asarray(images[i : i + batch_size], np.float32)
            padding = np.zeros((batch_size - len(chunk), *chunk.shape[1:]), np.float32)
            batch = np.concatenate([chunk, padding])
            logits.append(np.asarray(self.logits_fn(self.variables, batch))[: len(chunk)])
        if not logits:
            return np.zeros((0, len(self.class_names)))
        return metrics.probabilities(np.concatenate(logits))


def init_from_run(
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
    False it is copied like every other array.

    Raises:
      MedjaxError: naming the run and listing every missing, unexpected and mis-shaped array.
    """
    source = load_trained(workdir)
    if source.config.model_name != model_name:
        raise MedjaxError(
            f"init_from.path {workdir} is a run of {source.config.model_name!r}, but this config trains "
            f"{model_name!r}. Use the run's model_name and model settings (its config.json), or another run."
        )
    heads = _output_layers(model, image_shape)
    fresh_head = reinit_head or (reinit_head is None and len(source.class_names) != model.num_classes)
    found = traverse_util.flatten_dict(source.variables)
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
    print(
        f"Initialised {model_name} from run {workdir} (best checkpoint, step {source.step}, classes "
        f"{list(source.class_names)}){kept}.",
        flush=True,
    )
    return traverse_util.unflatten_dict(out)


def _output_layers(model: nn.Module, image_shape: tuple[int, int, int]) -> set[str]:
    """Top-level modules whose parameter shapes change with the class count: the classifier layer."""

    def shapes(num_classes: int) -> dict:
        dummy = jnp.zeros((1, *image_shape))
        keys = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
        init = jax.eval_shape(lambda: model.clone(num_classes=num_classes).init(keys, dummy, train=False))
        return traverse_util.flatten_dict(init["params"])

    a, b = shapes(model.num_classes), shapes(model.num_classes + 1)
    return {path[0] for path in a if a[path].shape != b[path].shape}


def write_dataset_info(workdir: Path, *, class_names: Sequence[str], label_counts: dict) -> None:
    """Records what a trained run needs to know about its data, so inference does not need the data."""
    info = {"class_names": list(class_names), "label_counts": {k: list(v) for k, v in label_counts.items()}}
    (Path(workdir) / DATASET_FILE).write_text(json.dumps(info, indent=2))


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a run was trained with (``<workdir>/config.json``)."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise MedjaxError(
            f"{path} not found: {workdir} is not a medjax run directory. Pass the --workdir of a run "
            "started with `python -m medjax.launch` (it holds config.json, dataset.json and checkpoints/)."
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_trained(workdir: str | Path) -> TrainedModel:
    """Restores the best-on-validation checkpoint of a run directory.

    Raises:
      MedjaxError: naming the missing file or checkpoint and what produces it.
    """
    workdir = Path(workdir)
    config = load_config(workdir)
    info_path = workdir / DATASET_FILE
    if not info_path.is_file():
        raise MedjaxError(f"{info_path} not found: it is written when training starts; rerun the run once.")
    class_names = tuple(json.loads(info_path.read_text())["class_names"])
    model = models.get_model(config.model_name, num_classes=len(class_names), **config.model)
    shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
    abstract = jax.eval_shape(
        lambda: model.init(
            {"params": jax.random.key(0), "dropout": jax.random.key(0)}, jnp.zeros(shape), train=False
        )
    )
    abstract = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}  # As saved.
    ckpt = RunCheckpointer(
        workdir / "checkpoints",
        keep=config.train.keep_checkpoints,
        best_metric=config.train.select_best_on,
        best_mode="min" if config.train.select_best_on == "loss" else "max",
    )
    try:
        step = ckpt.best_step()
        if step is None:
            raise MedjaxError(
                f"No best checkpoint in {workdir / 'checkpoints' / 'best'}: the run has not reached its "
                "first evaluation. Resume it with the same --workdir until it evaluates."
            )
        variables = ckpt.restore_best(abstract_variables=abstract)
    finally:
        ckpt.close()
    return TrainedModel(
        config=config,
        model=model,
        variables=jax.device_get(variables),
        class_names=class_names,
        step=int(step),
        workdir=workdir,
    )
