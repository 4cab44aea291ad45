"""Image transforms as small Grain transform classes (numpy + Pillow), configured from ``config.data``.

Every transform maps an element ``dict`` and rewrites only ``element['image']``, an (H, W, C) array that is
uint8 (as decoded) or float32 in [0, 1]; dtype and channel count are preserved except by
:class:`ToChannels` and :class:`ScaleAndNormalize`. Random transforms subclass ``grain.transforms.RandomMap``
and draw only from the generator Grain passes in, which Grain seeds from the pipeline seed and the
record's position: augmentations are then reproducible and independent of the number of workers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

Element = dict[str, Any]

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def _pil_apply(image: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Runs a Pillow image -> image function on an (H, W, C) array, keeping dtype and channels.

    uint8 images with 1 or 3 channels go through Pillow as 'L' / 'RGB'; anything else channel by
    channel in 32-bit float mode 'F', so float inputs are never quantised.
    """
    channels = image.shape[-1]
    if image.dtype == np.uint8 and channels in (1, 3):
        out = np.asarray(fn(Image.fromarray(image[..., 0] if channels == 1 else image)))
        return out[..., None] if channels == 1 else out
    planes = [np.asarray(fn(Image.fromarray(image[..., c].astype(np.float32)))) for c in range(channels)]
    return np.stack(planes, axis=-1).astype(image.dtype)


def _max_value(image: np.ndarray) -> float:
    return 255.0 if image.dtype == np.uint8 else 1.0


def _cast_like(values: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Clips to the valid range of ``image``'s dtype and casts back (rounding for uint8)."""
    values = np.clip(values, 0.0, _max_value(image))
    return np.round(values).astype(np.uint8) if image.dtype == np.uint8 else values.astype(image.dtype)


@dataclasses.dataclass(frozen=True)
class Resize(grain.transforms.Map):
    """Resizes to ``size`` x ``size`` with Pillow (aspect ratio not kept: medical slices are ~square)."""

    size: int
    interpolation: str = "bilinear"

    def map(self, element: Element) -> Element:
        image = element["image"]
        if image.shape[:2] == (self.size, self.size):
            return element
        resample = INTERPOLATIONS[self.interpolation]
        return {**element, "image": _pil_apply(image, lambda im: im.resize((self.size,) * 2, resample))}


@dataclasses.dataclass(frozen=True)
class ToChannels(grain.transforms.Map):
    """Converts between 1 and 3 channels: grey is replicated, RGB becomes ITU-R 601 luma (as Pillow 'L')."""

    channels: int

    def map(self, element: Element) -> Element:
        image = element["image"]
        have = image.shape[-1]
        if have == self.channels:
            return element
        if (have, self.channels) == (1, 3):
            return {**element, "image": np.repeat(image, 3, axis=-1)}
        if (have, self.channels) == (3, 1):
            luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            return {**element, "image": _cast_like(luma[..., None], image)}
        raise ValueError(f"Cannot convert {have} channels to {self.channels}.")


@dataclasses.dataclass(frozen=True)
class ScaleAndNormalize(grain.transforms.Map):
    """uint8 -> float32 in [0, 1] (float input is taken as already in [0, 1]), then ``(x - mean) / std``.

    ``mean`` and ``std`` are scalars or per-channel sequences.
    """

    mean: float | Sequence[float] = 0.0
    std: float | Sequence[float] = 1.0

    def map(self, element: Element) -> Element:
        image = element["image"].astype(np.float32)
        if element["image"].dtype == np.uint8:
            image = image / np.float32(255.0)
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        return {**element, "image": (image - mean) / std}


@dataclasses.dataclass(frozen=True)
class RandomHorizontalFlip(grain.transforms.RandomMap):
    """Mirrors left-right with probability ``p``."""

    p: float = 0.5

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        if rng.random() >= self.p:
            return element
        return {**element, "image": np.ascontiguousarray(element["image"][:, ::-1])}


@dataclasses.dataclass(frozen=True)
class RandomVerticalFlip(grain.transforms.RandomMap):
    """Mirrors top-bottom with probability ``p`` (off by default in configs: anatomy has an up)."""

    p: float = 0.5

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        if rng.random() >= self.p:
            return element
        return {**element, "image": np.ascontiguousarray(element["image"][::-1])}


@dataclasses.dataclass(frozen=True)
class RandomRotation(grain.transforms.RandomMap):
    """Rotates by an angle uniform in [-degrees, degrees] about the centre, filling corners with ``fill``."""

    degrees: float
    interpolation: str = "bilinear"
    fill: float = 0.0

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        angle = rng.uniform(-self.degrees, self.degrees)
        if angle == 0.0:
            return element
        resample = INTERPOLATIONS[self.interpolation]

        def rotate(im: Image.Image) -> Image.Image:
            fill = {"RGB": (round(self.fill),) * 3, "L": round(self.fill)}.get(im.mode, self.fill)
            return im.rotate(angle, resample=resample, fillcolor=fill)

        return {**element, "image": _pil_apply(element["image"], rotate)}


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop(grain.transforms.RandomMap):
    """Crops a random box of ``scale`` x area and ``ratio`` aspect, resized to ``size`` (Inception-style).

    Follows torchvision's sampling: 10 tries, then a centre crop of the closest valid aspect ratio. With
    ``scale=(1, 1)`` the box is the whole image, so the result equals :class:`Resize`.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        image = element["image"]
        box = self._sample_box(*image.shape[:2], rng)
        resample = INTERPOLATIONS[self.interpolation]
        cropped = _pil_apply(image, lambda im: im.resize((self.size,) * 2, resample, box=box))
        return {**element, "image": cropped}

    def _sample_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                return int(left), int(top), int(left + w), int(top + h)
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
        w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
        w, h = min(w, width), min(h, height)
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h


@dataclasses.dataclass(frozen=True)
class RandomBrightnessContrast(grain.transforms.RandomMap):
    """Adds ``U(-brightness, brightness)`` x full range, then scales contrast about the image mean by
    ``U(1 - contrast, 1 + contrast)``; clipped to the valid range (scanner and windowing variation)."""

    brightness: float = 0.0
    contrast: float = 0.0

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        image = element["image"]
        delta = rng.uniform(-self.brightness, self.brightness) * _max_value(image)
        factor = rng.uniform(1.0 - self.contrast, 1.0 + self.contrast)
        values = image.astype(np.float32) + delta
        values = (values - values.mean()) * factor + values.mean()
        return {**element, "image": _cast_like(values, image)}


def build_train_transforms(data_cfg: ml_collections.ConfigDict) -> list[grain.transforms.Transformation]:
    """Decoded record -> normalised float32 training image, with the augmentations ``data_cfg.augment`` asks.

    Reads ``channels``, ``image_size``, ``interpolation``, ``normalize.mean``,
    ``normalize.std`` and ``augment.{random_resized_crop_scale, rotation_degrees, hflip, vflip, brightness,
    contrast}``; a zero, False or None field leaves its transform out.
    """
    aug = data_cfg.augment
    size, interpolation = data_cfg.image_size, data_cfg.interpolation
    transforms: list[grain.transforms.Transformation] = []
    if aug.random_resized_crop_scale:
        scale = tuple(aug.random_resized_crop_scale)
        transforms.append(RandomResizedCrop(size, scale=scale, interpolation=interpolation))
    else:
        transforms.append(Resize(size, interpolation))
    if aug.rotation_degrees:
        transforms.append(RandomRotation(aug.rotation_degrees, interpolation=interpolation))
    if aug.hflip:
        transforms.append(RandomHorizontalFlip())
    if aug.vflip:
        transforms.append(RandomVerticalFlip())
    if aug.brightness or aug.contrast:
        transforms.append(RandomBrightnessContrast(aug.brightness, aug.contrast))
    # Channels last: grey sources (most of ours) are then augmented once, not three times.
    return [*transforms, ToChannels(data_cfg.channels), normalizer(data_cfg)]


@dataclasses.dataclass(frozen=True)
class Views(grain.transforms.RandomMap):
    """``count`` independently augmented copies of the image, stacked: ``(count, H, W, C)``.

    Each copy runs ``transforms`` in order on the element, drawing from the one generator Grain passes
    in (so the copies differ, and the result is still a function of the seed and the record's position).
    Self-supervised objectives compare the views of an image (:mod:`medjax.pretraining`).
    """

    transforms: tuple[grain.transforms.Transformation, ...]
    count: int = 2

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        views = []
        for _ in range(self.count):
            view = element
            for t in self.transforms:
                view = t.random_map(view, rng) if isinstance(t, grain.transforms.RandomMap) else t.map(view)
            views.append(view["image"])
        return {**element, "image": np.stack(views)}


def build_eval_transforms(data_cfg: ml_collections.ConfigDict) -> list[grain.transforms.Transformation]:
    """Decoded record -> normalised float32 image, deterministic (channels, resize, normalise only)."""
    return [
        Resize(data_cfg.image_size, data_cfg.interpolation),
        ToChannels(data_cfg.channels),
        normalizer(data_cfg),
    ]


def normalizer(data_cfg: ml_collections.ConfigDict) -> ScaleAndNormalize:
    """``ScaleAndNormalize`` from ``data.normalize.{mean, std}`` (scalars or per-channel sequences)."""

    def as_value(v: Any) -> float | tuple[float, ...]:
        return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)

    return ScaleAndNormalize(mean=as_value(data_cfg.normalize.mean), std=as_value(data_cfg.normalize.std))
