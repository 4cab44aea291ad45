"""Joint image/label transforms for segmentation: patch sampling, flips, rotation/scale, elastic, intensity.

Elements are dicts with ``image`` (H, W, C) uint8 or float32, ``label`` (H, W) uint8 class map and
``valid`` (H, W) uint8 (1 where the pixel counts in loss and metrics). Spatial transforms move all three
together; labels and ``valid`` are resampled **nearest-neighbour only**, so a transformed label map holds
only values that existed, and pixels brought in from outside the image get ``valid = 0`` (the loss never
learns from invented corners or padding). Intensity transforms are the classification ones of
:mod:`medjax.data.transforms`, which touch ``image`` only.

Training at full resolution on a CPU works on patches: :class:`RandomPatch` crops a window (padding with
``valid = 0`` when the image is smaller), centred with probability ``foreground_prob`` on a random
labelled pixel of a class drawn uniformly among those present (nnU-Net's oversampling, which keeps small
structures such as lesions in view), else anywhere. When rotation, scaling or elastic deformation is on,
the window is first cut ``context`` times larger and centre-cropped after the spatial transforms, so the
rotated patch has real pixels in its corners.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from medjax.data import transforms
from medjax.errors import ConfigError

Element = dict[str, Any]


def _planes(element: Element) -> list[str]:
    """Keys of the label-like planes: ``label``, ``valid`` and extra masks (e.g. a second observer)."""
    return [k for k, v in element.items() if k != "image" and isinstance(v, np.ndarray) and v.ndim == 2]


@dataclasses.dataclass(frozen=True)
class SegRecord(grain.transforms.Map):
    """Decoded TFDS record -> ``{'image', 'label', 'valid'}`` (the stored ``mask`` becomes ``label``).

    ``label`` rather than ``mask``: evaluation batches already use ``mask`` for "this row is a real example,
    not padding", and the train step reads its target from ``label`` for every task. ``extras`` names
    further stored masks to keep (DRIVE's ``second_observer``, for the human level in evaluation); they
    follow every spatial transform like ``label`` and arrive in batches as int32.
    """

    extras: tuple[str, ...] = ()

    def map(self, record: dict[str, Any]) -> Element:
        return {
            "image": np.asarray(record["image"]),
            "label": np.asarray(record["mask"])[..., 0],
            "valid": np.asarray(record["valid"])[..., 0],
            **{k: np.asarray(record[k])[..., 0] for k in self.extras},
        }


def _pad_to(element: Element, height: int, width: int) -> Element:
    """Zero-pads bottom/right up to (height, width); padding is background with ``valid = 0``."""
    h, w = element["label"].shape
    if h >= height and w >= width:
        return element
    pad = ((0, max(height - h, 0)), (0, max(width - w, 0)))
    image = element["image"]
    return {
        **element,
        "image": np.pad(image, (*pad, (0, 0))),
        **{k: np.pad(element[k], pad) for k in _planes(element)},
    }


def _crop(element: Element, top: int, left: int, height: int, width: int) -> Element:
    window = np.s_[top : top + height, left : left + width]
    return {**element, "image": element["image"][window], **{k: element[k][window] for k in _planes(element)}}


@dataclasses.dataclass(frozen=True)
class RandomPatch(grain.transforms.RandomMap):
    """A ``size`` (H, W) window, centred on foreground with probability ``foreground_prob`` (see above)."""

    size: tuple[int, int]
    foreground_prob: float = 0.0

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        height, width = self.size
        element = _pad_to(element, height, width)
        label, valid = element["label"], element["valid"]
        h, w = label.shape
        centre = None
        if rng.random() < self.foreground_prob:
            present = np.unique(label[(label > 0) & (valid > 0)])
            if present.size:
                rows, cols = np.nonzero((label == rng.choice(present)) & (valid > 0))
                pick = rng.integers(rows.size)
                centre = (int(rows[pick]), int(cols[pick]))
        if centre is None:
            top, left = int(rng.integers(h - height + 1)), int(rng.integers(w - width + 1))
        else:
            top = min(max(centre[0] - height // 2, 0), h - height)
            left = min(max(centre[1] - width // 2, 0), w - width)
        return _crop(element, top, left, height, width)


@dataclasses.dataclass(frozen=True)
class CenterCrop(grain.transforms.Map):
    """The central ``size`` (H, W) window (padded with ``valid = 0`` when the image is smaller)."""

    size: tuple[int, int]

    def map(self, element: Element) -> Element:
        element = _pad_to(element, *self.size)
        h, w = element["label"].shape
        return _crop(element, (h - self.size[0]) // 2, (w - self.size[1]) // 2, *self.size)


@dataclasses.dataclass(frozen=True)
class PadToMultiple(grain.transforms.Map):
    """Pads bottom/right to ``shape`` (the split's largest image) rounded up to ``multiple``.

    Evaluation batches then have one static shape even when image sizes vary, and whole-image inference
    through a network that downsamples ``log2(multiple)`` times sees divisible sizes; padding is invalid.
    """

    shape: tuple[int, int]
    multiple: int = 1

    def map(self, element: Element) -> Element:
        shape = zip(element["label"].shape, self.shape, strict=True)
        return _pad_to(element, *(-(-max(s, t) // self.multiple) * self.multiple for s, t in shape))


@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
    """Mirrors image, label and valid together: left-right with ``p_horizontal``, up-down ``p_vertical``."""

    p_horizontal: float = 0.5
    p_vertical: float = 0.0

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        flip_h, flip_v = rng.random() < self.p_horizontal, rng.random() < self.p_vertical
        step = np.s_[:: -1 if flip_v else 1, :: -1 if flip_h else 1]
        if not (flip_h or flip_v):
            return element
        moved = {k: np.ascontiguousarray(element[k][step]) for k in ("image", *_planes(element))}
        return {**element, **moved}


def rotate_scale(element: Element, angle: float, zoom: float) -> Element:
    """Rotates by ``angle`` degrees (clockwise on screen) and zooms by ``zoom`` about the image centre.

    Image bilinear (uint8 input), label and valid nearest; pixels from outside the image are 0 and invalid.
    """
    image = element["image"]
    if image.dtype != np.uint8:
        raise TypeError("rotate_scale expects uint8 images (put it before normalisation)")
    h, w = element["label"].shape
    cos, sin = math.cos(math.radians(angle)) / zoom, math.sin(math.radians(angle)) / zoom
    cx, cy = w / 2.0, h / 2.0
    # PIL maps each output pixel (x, y) to the input point (a x + b y + c, d x + e y + f).
    coeffs = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)

    def warp(plane: np.ndarray, resample: Image.Resampling) -> np.ndarray:
        grey = plane.ndim == 3 and plane.shape[-1] == 1
        pil = Image.fromarray(plane[..., 0] if grey else plane)
        out = np.asarray(pil.transform((w, h), Image.Transform.AFFINE, coeffs, resample, fillcolor=0))
        return out[..., None] if grey else out

    return {
        **element,
        "image": warp(image, Image.Resampling.BILINEAR),
        **{k: warp(element[k], Image.Resampling.NEAREST) for k in _planes(element)},
    }


@dataclasses.dataclass(frozen=True)
class RandomRotateScale(grain.transforms.RandomMap):
    """:func:`rotate_scale` by U(-degrees, degrees) and U(*scale), with probability ``p``."""

    degrees: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    p: float = 1.0

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        angle = rng.uniform(-self.degrees, self.degrees)
        zoom = rng.uniform(*self.scale)
        if rng.random() >= self.p or (angle == 0.0 and zoom == 1.0):
            return element
        return rotate_scale(element, angle, zoom)


@dataclasses.dataclass(frozen=True)
class RandomElastic(grain.transforms.RandomMap):
    """Elastic deformation (Simard et al. 2003), with probability ``p``: a random displacement field with
    components U(-1, 1), Gaussian-smoothed with ``sigma`` px and scaled to ``alpha`` px. Image linear,
    label and valid nearest; pixels pulled from outside the image are invalid."""

    alpha: float
    sigma: float
    p: float = 0.5

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        if rng.random() >= self.p:
            return element
        from scipy import ndimage  # Imported lazily: only elastic augmentation needs it.

        h, w = element["label"].shape
        field = [ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), self.sigma) for _ in range(2)]
        norm = max(float(np.abs(np.stack(field)).max()), 1e-12)
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        coords = [rows + field[0] * self.alpha / norm, cols + field[1] * self.alpha / norm]

        def warp(plane: np.ndarray, order: int) -> np.ndarray:
            out = ndimage.map_coordinates(plane.astype(np.float32), coords, order=order, mode="constant")
            return np.round(out).astype(plane.dtype) if plane.dtype == np.uint8 else out.astype(plane.dtype)

        image = element["image"]
        planes = [warp(image[..., c], 1) for c in range(image.shape[-1])]
        labels = {k: warp(element[k], 0) for k in _planes(element)}
        return {**element, "image": np.stack(planes, -1), **labels}


@dataclasses.dataclass(frozen=True)
class ToBatchTypes(grain.transforms.Map):
    """``label`` (and extra masks) -> int32 and ``valid`` -> bool, the dtypes the steps receive."""

    def map(self, element: Element) -> Element:
        planes = {k: element[k].astype(np.int32) for k in _planes(element)}
        return {**element, **planes, "valid": element["valid"].astype(bool)}


def patch_size(data_cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    """``data.patch_size`` (int or (H, W)), else ``data.image_size``, as an (H, W) pair."""
    size = data_cfg.patch_size or data_cfg.image_size
    return (int(size), int(size)) if isinstance(size, int | float) else (int(size[0]), int(size[1]))


def build_train_transforms(data_cfg: ml_collections.ConfigDict) -> list[grain.transforms.Transformation]:
    """:class:`SegRecord` element -> normalised float32 training patch with its label and valid maps.

    Reads ``patch_size`` (else ``image_size``), ``foreground_prob``, ``channels``,
    ``normalize`` and ``augment.{hflip, vflip, rotation_degrees, scale, elastic_alpha, elastic_sigma,
    brightness, contrast}``; a zero, False or None field leaves its transform out.
    """
    aug = data_cfg.augment
    if aug.get("random_resized_crop_scale"):
        raise ConfigError(
            "data.augment.random_resized_crop_scale is a classification augmentation; segmentation crops "
            "patches (data.patch_size, data.foreground_prob) and zooms with data.augment.scale: set it None."
        )
    size = patch_size(data_cfg)
    scale = tuple(aug.scale)
    elastic = aug.elastic_alpha
    spatial: list[grain.transforms.Transformation] = []
    if aug.get("rotation_degrees") or scale != (1.0, 1.0):
        spatial.append(RandomRotateScale(float(aug.get("rotation_degrees") or 0.0), scale))
    if elastic:
        spatial.append(RandomElastic(float(elastic), float(aug.elastic_sigma)))
    # A larger window before rotating/zooming out keeps real pixels in the corners of the final patch.
    context = 1.0 if not spatial else math.sqrt(2.0) * max(1.0, 1.0 / scale[0])
    window = tuple(math.ceil(s * context) for s in size)
    steps: list[grain.transforms.Transformation] = [RandomPatch(window, float(data_cfg.foreground_prob))]
    if aug.get("hflip") or aug.get("vflip"):
        steps.append(RandomFlip(0.5 if aug.get("hflip") else 0.0, 0.5 if aug.get("vflip") else 0.0))
    steps += spatial
    if spatial:
        steps.append(CenterCrop(size))
    if aug.get("brightness") or aug.get("contrast"):
        steps.append(
            transforms.RandomBrightnessContrast(aug.get("brightness", 0.0), aug.get("contrast", 0.0))
        )
    return [*steps, transforms.ToChannels(data_cfg.channels), transforms.normalizer(data_cfg), ToBatchTypes()]


def build_eval_transforms(
    data_cfg: ml_collections.ConfigDict, *, shape: tuple[int, int]
) -> list[grain.transforms.Transformation]:
    """:class:`SegRecord` element -> whole normalised image padded to ``shape`` rounded up to
    ``data.pad_multiple``, with label and valid maps (padding invalid)."""
    return [
        PadToMultiple(tuple(shape), int(data_cfg.pad_multiple)),
        transforms.ToChannels(data_cfg.channels),
        transforms.normalizer(data_cfg),
        ToBatchTypes(),
    ]
