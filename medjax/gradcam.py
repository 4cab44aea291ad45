"""Grad-CAM and Grad-CAM++ class-activation maps for every medjax model, and a figure of them on a split.

Both methods explain one class score ``y`` (a logit, before softmax) through the last spatial feature map
``A`` of shape ``(h, w, C)`` (``aux['feature_map']``, see DESIGN.md's model contract): each channel gets a
weight ``w_c`` from the gradient ``G = dy/dA``, and the map is ``relu(sum_c w_c A_c)``, upsampled
bilinearly to the input size and divided by its maximum, so every map lies in [0, 1] (an all-zero map
means no positive evidence anywhere).

* Grad-CAM (Selvaraju et al. 2017): ``w_c = mean_ij G_ij^c``.
* Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with the exponential-score closed form):
  ``alpha_ij^c = G^2 / (2 G^2 + sum_ab A_ab^c G^3)`` (0 where the denominator is 0) and
  ``w_c = sum_ij alpha_ij^c relu(G_ij^c)``; it credits several separate instances of a finding (several
  lesions) instead of letting the strongest dominate the average. The closed form assumes non-negative
  activations (post-ReLU maps, as MobileNetV2's). ConvNeXt and MedNeXt end in a signed, LayerNorm'd
  residual stream: there ``sum_ab A_ab`` is negative for most channels (78 % on the ConvNeXt of
  ``tests/test_gradcam.py``), ``alpha`` changes sign or explodes, and the share of CAM mass inside the
  lesion masks fell to near chance (0.048 against a mask area of 0.036). Our choice: the sum runs over
  ``relu(A)``, which is the paper's formula whenever ``A >= 0`` and gives 0.39 there (Grad-CAM: 0.20).

``G`` is read through ``Module.perturb('feature_map', ...)`` in each model: when the caller passes a
``'perturbations'`` collection, the model adds it (zeros) to the feature map, and the gradient with
respect to that collection is ``G``. The models skip the call while initialising, so ``model.init``
returns only ``params`` / ``batch_stats`` as before and ordinary ``apply`` calls are unchanged.

The class explained defaults to the predicted one (what made the model decide), also for wrong
predictions. ``python -m medjax.gradcam --workdir=RUN`` draws a grid of overlays on a split, grouped by true
class and right/wrong, and on datasets with a ``lesion_mask`` (``synthetic_ct``) reports how much of the
CAM mass falls inside the mask against the mask's area (the chance level).
"""

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import linen as nn
from PIL import Image

from medjax import cli, inference, run_dir
from medjax.data import pipeline, transforms
from medjax.errors import MedjaxError

METHODS = ("gradcam", "gradcam++")


class Explanation(NamedTuple):
    """CAMs of a batch with the prediction they explain.

    Attributes:
      cams: ``(N, H, W)`` float32 maps in [0, 1] at the input resolution.
      probs: ``(N, K)`` softmax probabilities of the same forward pass.
      target: ``(N,)`` class index each map explains.
    """

    cams: np.ndarray
    probs: np.ndarray
    target: np.ndarray


def channel_weights(activations: jax.Array, grads: jax.Array, *, method: str) -> jax.Array:
    """Per-channel weights ``(N, C)`` from feature maps and score gradients, both ``(N, h, w, C)``."""
    if method == "gradcam":
        return grads.mean(axis=(1, 2))
    if method == "gradcam++":
        g2 = grads**2
        # relu: the closed form assumes A >= 0 (ReLU maps, as MobileNetV2's); see the module docstring.
        mass = jax.nn.relu(activations).sum(axis=(1, 2), keepdims=True)
        denominator = 2.0 * g2 + mass * g2 * grads
        safe = jnp.where(denominator != 0.0, denominator, 1.0)
        alpha = jnp.where(denominator != 0.0, g2 / safe, 0.0)
        return (alpha * jax.nn.relu(grads)).sum(axis=(1, 2))
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _frozen(value):
    """Lists (as configs read back from JSON hold them) -> tuples, recursively, so a module hashes."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list | tuple) else value


def _static(model: nn.Module) -> nn.Module:
    """``model`` with hashable attributes: it is a static argument of the jitted explainer, so one
    compilation serves every call with the same model definition and input shape."""
    fields = [f.name for f in dataclasses.fields(model) if f.init and f.name not in ("parent", "name")]
    return model.clone(**{name: _frozen(getattr(model, name)) for name in fields})


@functools.partial(jax.jit, static_argnames=("model", "method"))
def _explain_batch(variables, images, target, *, model: nn.Module, method: str):
    """(cams, probs, explained class) of one batch; ``target < 0`` explains the predicted class."""

    def score(perturbation):
        logits, aux = model.apply(
            {**variables, "perturbations": {"feature_map": perturbation}}, images, train=False
        )
        chosen = jnp.where(target < 0, jnp.argmax(logits, axis=-1), target)
        # Examples are independent in inference mode, so the gradient of the sum is each example's own.
        total = jnp.take_along_axis(logits, chosen[:, None], axis=-1).sum()
        return total, (logits, aux["feature_map"], chosen)

    fmap_shape = jax.eval_shape(lambda: model.apply(variables, images, train=False))[1]["feature_map"]
    grads, (logits, fmap, chosen) = jax.grad(score, has_aux=True)(
        jnp.zeros(fmap_shape.shape, fmap_shape.dtype)
    )
    weights = channel_weights(fmap, grads, method=method)
    maps = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", fmap, weights))
    maps = jax.image.resize(maps, (maps.shape[0], *images.shape[1:3]), "bilinear")
    peak = maps.max(axis=(1, 2), keepdims=True)
    maps = jnp.where(peak > 0, maps / jnp.where(peak > 0, peak, 1.0), 0.0)
    return maps, jax.nn.softmax(logits, axis=-1), chosen


def explain(
    model: nn.Module | run_dir.TrainedModel,
    variables: dict | None,
    images: np.ndarray,
    *,
    target_class: int | Sequence[int] | np.ndarray | None = None,
    method: str = "gradcam",
    batch_size: int = 32,
) -> Explanation:
    """Class-activation maps of preprocessed ``(N, H, W, C)`` images, with the probabilities they explain.

    Args:
      model: a medjax model (its ``aux['feature_map']`` must pass through ``self.perturb``), or a
        :class:`medjax.run_dir.TrainedModel`, whose variables are used when ``variables`` is None.
      variables: ``{'params', 'batch_stats'}``.
      images: model inputs, already preprocessed (``TrainedModel.preprocess``).
      target_class: class to explain: None for each image's predicted class, one index for all, or one
        per image.
      method: 'gradcam' or 'gradcam++'.
      batch_size: images per jitted call; the last chunk is zero-padded, so a long list compiles once.
    """
    if isinstance(model, run_dir.TrainedModel):
        variables = model.variables if variables is None else variables
        model = model.model
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if variables is None:
        raise ValueError("variables are required unless model is a TrainedModel")
    images = np.asarray(images, np.float32)
    n = len(images)
    if n == 0:
        raise ValueError("explain() needs at least one image")
    target = np.broadcast_to(np.asarray(-1 if target_class is None else target_class, np.int32), (n,))
    variables = {k: v for k, v in variables.items() if k != "perturbations"}
    static_model = _static(model)
    outputs = inference.map_batches(
        lambda chunk, chunk_target: _explain_batch(
            variables, chunk, chunk_target, model=static_model, method=method
        ),
        images,
        target,
        batch_size=max(1, min(batch_size, n)),
    )
    return Explanation(*outputs)


def cam(
    model: nn.Module | run_dir.TrainedModel,
    variables: dict | None,
    images: np.ndarray,
    *,
    target_class: int | Sequence[int] | np.ndarray | None = None,
    method: str = "gradcam",
    batch_size: int = 32,
) -> np.ndarray:
    """``(N, H, W)`` maps in [0, 1]; :func:`explain` without the probabilities."""
    return explain(
        model, variables, images, target_class=target_class, method=method, batch_size=batch_size
    ).cams


def mask_mass_fraction(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each map's total mass inside a boolean ``(N, H, W)`` mask (NaN for an all-zero map).

    A map that ignored the mask would score the mask's area fraction, ``masks.mean(axis=(1, 2))``.
    """
    cams = np.asarray(cams, np.float64)
    total = cams.sum(axis=(1, 2))
    inside = (cams * np.asarray(masks, bool)).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def to_display(images: np.ndarray, normalize) -> np.ndarray:
    """Undoes ``config.data.normalize`` on preprocessed images: float ``(N, H, W, C)`` in [0, 1]."""
    mean, std = (np.asarray(normalize[k], np.float32) for k in ("mean", "std"))
    return np.clip(np.asarray(images, np.float32) * std + mean, 0.0, 1.0)


def blend_overlay(image: np.ndarray, cam_map: np.ndarray, *, alpha: float = 0.4) -> np.ndarray:
    """``image`` (uint8, or float in [0, 1]; ``(H, W, 1|3)``) with ``cam_map`` in the 'jet' colour map
    blended on top, as uint8 RGB ``(H, W, 3)``; the map is resized bilinearly to the image when they differ,
    so a CAM computed at the model's input size can be shown on the original file."""
    from matplotlib import colormaps

    image = np.asarray(image)
    rgb = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    rgb = np.broadcast_to(rgb, (*rgb.shape[:2], 3))
    height, width = rgb.shape[:2]
    if cam_map.shape != (height, width):
        resized = Image.fromarray(np.asarray(cam_map, np.float32), "F").resize(
            (width, height), Image.Resampling.BILINEAR
        )
        cam_map = np.asarray(resized)
    heat = colormaps["jet"](np.clip(cam_map, 0.0, 1.0))[..., :3]
    return np.round(((1.0 - alpha) * rgb + alpha * heat) * 255.0).astype(np.uint8)


def overlay_grid(
    images: np.ndarray,
    cams: np.ndarray,
    labels: Sequence[int],
    preds: Sequence[int],
    class_names: Sequence[str],
    path: str | Path,
    *,
    per_group: int = 4,
    probs: np.ndarray | None = None,
) -> Path:
    """Saves a PNG grid: one row per (true class, right or wrong) group, up to ``per_group`` examples each.

    Args:
      images: display images, float ``(N, H, W, 1|3)`` in [0, 1] (see :func:`to_display`).
      cams: ``(N, H, W)`` maps in [0, 1].
      labels, preds: true and predicted class indices.
      class_names: label names, index = class id.
      path: output PNG file.
      per_group: examples shown per group, in the order given.
      probs: optional ``(N, K)`` probabilities; the predicted class's is printed above each image.
    """
    import matplotlib

    matplotlib.use("Agg")  # Files only: works without a display and in worker processes.
    import matplotlib.pyplot as plt

    labels, preds = np.asarray(labels), np.asarray(preds)
    groups = []
    for k, name in enumerate(class_names):
        for right in (True, False):
            members = np.nonzero((labels == k) & ((preds == k) == right))[0][:per_group]
            if len(members):
                groups.append((f"{name}: {'right' if right else 'wrong'}", members))
    if not groups:
        raise ValueError("overlay_grid() got no examples")
    cols = max(len(members) for _, members in groups)
    fig, axes = plt.subplots(len(groups), cols, figsize=(2.2 * cols, 2.4 * len(groups)), squeeze=False)
    for row, (title, members) in enumerate(groups):
        for col, ax in enumerate(axes[row]):
            if col >= len(members):
                ax.axis("off")
                continue
            i = members[col]
            ax.imshow(blend_overlay(images[i], cams[i]))
            ax.set_xticks([])
            ax.set_yticks([])
            caption = f"pred {class_names[preds[i]]}"
            ax.set_title(caption if probs is None else f"{caption} {probs[i, preds[i]]:.2f}", fontsize=8)
        axes[row][0].set_ylabel(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def explain_split(
    model: run_dir.TrainedModel,
    data_cfg,
    *,
    split: str,
    method: str = "gradcam",
    per_group: int = 4,
) -> tuple[dict[str, np.ndarray], dict]:
    """CAMs of the predicted class over every example of ``split``, keeping ``per_group`` per group.

    Returns ``(examples, summary)``: ``examples`` holds the kept ``images`` (display form), ``cams``,
    ``labels``, ``preds`` and ``probs``; ``summary`` counts every group and, when the dataset has a
    ``lesion_mask`` feature, gives the mean CAM mass inside the mask and the mask's mean area fraction over
    the correctly classified examples whose mask is not empty.
    """
    source, info = pipeline.load_source(data_cfg, split)
    has_mask = "lesion_mask" in info.features
    resize_mask = transforms.Resize(data_cfg.image_size, "nearest")
    kept: dict[str, list] = {k: [] for k in ("images", "cams", "labels", "preds", "probs")}
    counts: dict[tuple[int, bool], int] = {}
    in_mask, area = [], []

    def explain_batch(batch: dict) -> dict:
        # The whole padded batch: one shape, one compilation; the inference pass drops the padding.
        out = explain(model, None, batch["image"], method=method, batch_size=len(batch["image"]))
        return {"cams": out.cams, "probs": out.probs}

    for rows, out in inference.iterate_split(explain_batch, data_cfg, split=split):
        display = to_display(rows["image"], data_cfg.normalize)
        for j, (label, index) in enumerate(zip(rows["label"].tolist(), rows["index"].tolist(), strict=True)):
            pred = int(out["probs"][j].argmax())
            group = (label, label == pred)
            counts[group] = counts.get(group, 0) + 1
            if counts[group] <= per_group:
                values = (display[j], out["cams"][j], label, pred, out["probs"][j])
                for key, value in zip(kept, values, strict=True):
                    kept[key].append(value)
            if has_mask and label == pred:
                mask = (
                    resize_mask.map({"image": np.asarray(source[index]["lesion_mask"])})["image"][..., 0] > 0
                )
                if mask.any():
                    in_mask.append(mask_mass_fraction(out["cams"][j][None], mask[None])[0])
                    area.append(mask.mean())
    names = model.class_names
    summary = {
        "split": split,
        "method": method,
        "counts": {
            f"{names[k]}: {'right' if ok else 'wrong'}": counts[k, ok]
            for k, ok in sorted(counts, key=lambda group: (group[0], not group[1]))
        },
    }
    if has_mask:
        summary["lesion_mask"] = {
            "examples": len(in_mask),
            "cam_mass_in_mask": float(np.nanmean(in_mask)) if in_mask else None,
            "mask_area_fraction": float(np.mean(area)) if area else None,
        }
    return {k: np.stack(v) for k, v in kept.items()}, summary


def run(
    workdir: str | Path,
    *,
    split: str | None = None,
    out: str | Path | None = None,
    per_group: int = 4,
    method: str = "gradcam",
    data_dir: str | None = None,
) -> tuple[Path, dict]:
    """What ``python -m medjax.gradcam`` does: the overlay grid and summary of a run on one split.

    Writes ``<out>/<method>_<split>.png`` and ``.json`` (``out`` defaults to ``<workdir>/gradcam``; '+' is
    spelt 'p' in file names) and returns ``(figure path, summary)`` (see :func:`explain_split`).

    Raises:
      MedjaxError: when ``workdir`` is not a finished run or its data cannot be found.
    """
    model = run_dir.load_run(workdir)
    data_cfg = model.config.data
    if data_dir is not None:
        data_cfg.data_dir = data_dir
    split = split or data_cfg.test_split
    examples, summary = explain_split(model, data_cfg, split=split, method=method, per_group=per_group)
    out = Path(out) if out is not None else model.run_dir.gradcam_dir
    stem = f"{method.replace('+', 'p')}_{split}"
    figure = overlay_grid(
        examples["images"],
        examples["cams"],
        examples["labels"],
        examples["preds"],
        model.class_names,
        out / f"{stem}.png",
        per_group=per_group,
        probs=examples["probs"],
    )
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    return figure, summary


def _define_flags() -> None:
    """Flags exist only when run as a program, so importing this module next to other CLIs (evaluate,
    predict) in one process cannot collide on shared names such as --workdir."""
    flags.DEFINE_string("workdir", None, "Run directory written by `python -m medjax.launch`.", required=True)
    flags.DEFINE_string("split", None, "Split to explain (default: the run's config.data.test_split).")
    flags.DEFINE_string("out", None, "Output directory (default: <workdir>/gradcam).")
    flags.DEFINE_integer("per_group", 4, "Examples shown per (true class, right/wrong) group.")
    flags.DEFINE_enum("method", "gradcam", METHODS, "CAM weighting.")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir, if not the one the run was trained with.")


def main(argv: list[str]) -> None:
    del argv
    cli.setup()
    f = flags.FLAGS
    try:
        figure, summary = run(
            f.workdir, split=f.split, out=f.out, per_group=f.per_group, method=f.method, data_dir=f.data_dir
        )
    except MedjaxError as e:
        raise SystemExit(f"medjax: error: {e}") from None
    print(json.dumps(summary, indent=2))
    print(f"Figure: {figure}")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
