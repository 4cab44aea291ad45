"""The segmentation example schema shared by every segmentation builder, and its mask decoding.

Every segmentation dataset stores, per example (one 2-D image or one slice of a volume):

* ``image``: PNG, (H, W, C) uint8, at native resolution unless the builder's ``image_size`` resizes it;
* ``mask``: PNG, (H, W, 1) uint8 label map (0 = background, k = class k), never interpolated bilinearly;
* ``valid``: PNG, (H, W, 1) uint8, 1 where the pixel counts in loss and metrics (DRIVE's field of view;
  all ones when a dataset has no such region, so readers need no special case);
* ``id`` (unique), ``case_id`` (patient or volume; the image's own id for 2-D data), ``slice_index``
  (-1 for 2-D data) and ``spacing`` float32 (dy, dx, dz) in mm (0 where unknown), so that volume
  metrics can reassemble cases and distances can be measured in mm;
* optional extra masks declared by the builder (DRIVE's ``second_observer``).

PNG is lossless and TFDS writes encoded bytes without TensorFlow. The dataset-level facts a trainer needs
before reading a batch live in ``info.metadata['segmentation']`` (written to ``metadata.json``):
``class_names`` (background first), ``num_classes``, ``pixel_counts`` per split and class (inside
``valid``), ``valid_pixels`` per split and ``max_shape`` (largest (H, W) per split, for eval padding).
:class:`SegmentationStats` gathers them while examples are written, so no second pass is needed.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from medjax.data import images
from medjax.data.builders._folder import _coerce

METADATA_KEY = "segmentation"
LABEL_MODES = ("auto", "binary", "labels")
# Grey-coded label maps (0/85/170/255) are ranked; label maps whose largest value is below this are kept as
# stored (class k may simply be absent from the files).
_DIRECT_LABEL_LIMIT = 32


def coerce_fields(config: tfds.core.BuilderConfig) -> None:
    """Type-checks a config's own fields against their defaults (lists from JSON or ml_collections
    become tuples, ints become floats where the default is a float), as the classification configs do."""
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    for field in dataclasses.fields(config):
        if field.name not in base:
            setattr(config, field.name, _coerce(field.name, getattr(config, field.name), field.default))


def check_options(dataset: str, checks: Sequence[tuple[bool, str]]) -> None:
    """Raises ValueError naming ``dataset`` and the first failed ``(ok, message)`` option check."""
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{dataset}: {message}")


def features(
    channels: int,
    *,
    extra_masks: Sequence[str] = (),
    extra: Mapping[str, tfds.features.FeatureConnector] | None = None,
) -> tfds.features.FeaturesDict:
    """The shared schema (module docstring), ``extra_masks`` stored like ``mask``, and ``extra`` features."""
    plane = (None, None, 1)
    spec = {
        "image": tfds.features.Image(shape=(None, None, channels), encoding_format="png"),
        "mask": tfds.features.Image(shape=plane, encoding_format="png"),
        "valid": tfds.features.Image(shape=plane, encoding_format="png"),
        "id": tfds.features.Text(),
        "case_id": tfds.features.Text(),
        "slice_index": tfds.features.Scalar(dtype=np.int32),
        "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
    }
    spec.update({name: tfds.features.Image(shape=plane, encoding_format="png") for name in extra_masks})
    spec.update(extra or {})
    return tfds.features.FeaturesDict(spec)


@dataclasses.dataclass
class Example:
    """One decoded example before encoding: ``image`` (H, W, C) uint8, ``mask`` (H, W) uint8 labels."""

    id: str
    image: np.ndarray
    mask: np.ndarray
    valid: np.ndarray | None = None
    case_id: str = ""
    slice_index: int = -1
    spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def encode(self) -> dict:
        """The TFDS feature dict: every plane as PNG bytes (TFDS stays TensorFlow-free)."""
        valid = np.ones(self.mask.shape, np.uint8) if self.valid is None else self.valid.astype(np.uint8)
        return {
            "image": images.encode_png(self.image),
            "mask": images.encode_png(self.mask[..., None]),
            "valid": images.encode_png(valid[..., None]),
            "id": self.id,
            "case_id": self.case_id or self.id,
            "slice_index": np.int32(self.slice_index),
            "spacing": np.asarray(self.spacing, np.float32),
            **{k: images.encode_png(v.astype(np.uint8)[..., None]) for k, v in self.extras.items()},
        }


class SegmentationStats:
    """Accumulates the ``info.metadata['segmentation']`` facts while examples are generated.

    TFDS writes ``metadata.json`` after every split is generated, so counting inside the generators is both
    complete and free (no second decoding pass).
    """

    def __init__(self, metadata: tfds.core.MetadataDict, class_names: Sequence[str], **extra):
        self._meta = {
            "class_names": list(class_names),
            "num_classes": len(class_names),
            "pixel_counts": {},
            "valid_pixels": {},
            "max_shape": {},
            **extra,
        }
        metadata[METADATA_KEY] = self._meta

    def add(self, split: str, example: Example) -> dict:
        """Counts ``example`` into ``split``, checks its labels, returns its encoded feature dict."""
        k = self._meta["num_classes"]
        if example.mask.shape != example.image.shape[:2]:
            raise ValueError(f"{example.id}: mask {example.mask.shape} vs image {example.image.shape[:2]}")
        if int(example.mask.max(initial=0)) >= k:
            raise ValueError(
                f"{example.id}: label {int(example.mask.max())} but the dataset has {k} classes "
                f"{self._meta['class_names']}"
            )
        inside = example.mask if example.valid is None else example.mask[example.valid.astype(bool)]
        counts = np.bincount(inside.ravel(), minlength=k)
        old = self._meta["pixel_counts"].get(split, [0] * k)
        self._meta["pixel_counts"][split] = [int(a + b) for a, b in zip(old, counts, strict=True)]
        self._meta["valid_pixels"][split] = self._meta["valid_pixels"].get(split, 0) + int(inside.size)
        h, w = example.mask.shape
        oh, ow = self._meta["max_shape"].get(split, (0, 0))
        self._meta["max_shape"][split] = [max(h, oh), max(w, ow)]
        return example.encode()


def read_metadata(info: tfds.core.DatasetInfo) -> dict | None:
    """``info.metadata['segmentation']`` of a prepared dataset, or None for classification datasets."""
    return None if info.metadata is None else info.metadata.get(METADATA_KEY)


def decode_mask_file(path: str | os.PathLike) -> np.ndarray:
    """Raw label plane of a mask file: palette indices for 'P' images, grey values otherwise.

    RGB masks whose three channels are equal count as grey; truly coloured masks are returned (H, W, 3)
    for :func:`colours_to_labels`. Raises :class:`medjax.data.images.ImageDecodeError`.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode == "P":
                return np.asarray(img).astype(np.uint8)  # Indices, not colours: VOC-style palette masks.
            if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                values = np.asarray(img)
                if values.min() < 0 or values.max() > 255 or not np.all(np.mod(values, 1) == 0):
                    raise images.ImageDecodeError(f"{path}: label values outside 0..255 or not integers")
                return values.astype(np.uint8)
            array = np.asarray(img.convert("RGB") if mode not in ("L", "1") else img.convert("L"))
    except images.ImageDecodeError:
        raise
    except Exception as e:  # Pillow raises many types for broken files.
        raise images.ImageDecodeError(f"{path}: unreadable mask ({e})") from e
    if array.ndim == 3 and (array == array[..., :1]).all():
        return array[..., 0]
    return array


def colours_to_labels(plane: np.ndarray, class_colors: Sequence[Sequence[float]], source: str) -> np.ndarray:
    """Maps an (H, W, 3) colour mask to labels: class k is ``class_colors[k]``; other colours are an error."""
    out = np.full(plane.shape[:2], 255, np.uint8)
    for k, colour in enumerate(class_colors):
        out[(plane == np.asarray(colour, plane.dtype)).all(-1)] = k
    if (out == 255).any():
        y, x = np.argwhere(out == 255)[0]
        raise images.ImageDecodeError(
            f"{source}: colour {tuple(int(c) for c in plane[y, x])} at row {y}, column {x} is not one of "
            f"class_colors {[tuple(c) for c in class_colors]}"
        )
    return out


def histogram(plane: np.ndarray) -> np.ndarray:
    """Pixel count per value 0..255 of a uint8 plane (several times faster than ``np.unique``)."""
    return np.bincount(plane.ravel(), minlength=256)


def label_mapping(hist: np.ndarray, mode: str) -> tuple[dict[int, int] | None, str]:
    """How stored mask values become labels, from the value histogram of every mask of a dataset.

    Returns ``(mapping or None for identity, explanation)``. ``binary``: value > 0 (0/1 masks) or > 127
    (0/255 masks, also JPEG-compressed ones) is foreground; ``labels``: values kept as stored. ``auto``
    decides, in order: values all below 32 are a label map kept as stored; {0, 255} is binary; more than
    32 distinct values, or more than 8 of which under 1 % of the pixels lie in 64..191, are the grey
    levels JPEG compression smears into 0/255 masks (Kvasir-SEG), read as binary; a few distinct values
    are a grey-coded label map (0/85/170/255), ranked 0..K-1. The explanation goes in the preparation
    report.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {mode!r}")
    values = [int(v) for v in np.flatnonzero(hist)]
    top = max(values, default=0)
    middle = float(hist[64:192].sum()) / max(float(hist.sum()), 1.0)
    smeared = mode == "auto" and top >= 32 and (len(values) > 32 or (len(values) > 8 and middle < 0.01))
    if mode == "binary" or smeared or (mode == "auto" and set(values) <= {0, 255} and top == 255):
        cut = 0 if top <= 1 else 127
        why = f" ({len(values)} grey levels: JPEG-compressed binary masks)" if smeared else ""
        return {v: int(v > cut) for v in values}, f"binary: value > {cut} is foreground{why}"
    if mode == "labels" or top < _DIRECT_LABEL_LIMIT:
        return None, "label map: values kept as stored"
    ranked = {v: i for i, v in enumerate(values)}
    return ranked, f"grey-coded label map: values {values} ranked 0..{len(ranked) - 1}"


def apply_mapping(plane: np.ndarray, mapping: Mapping[int, int] | None) -> np.ndarray:
    if mapping is None:
        return plane.astype(np.uint8)
    lut = np.zeros(256, np.uint8)
    for value, label in mapping.items():
        lut[value] = label
    return lut[plane]


def decode_png(data: bytes) -> np.ndarray:
    """(H, W, C) uint8 array of PNG bytes written by :func:`medjax.data.images.encode_png`."""
    array = np.asarray(Image.open(io.BytesIO(data)))
    return array[..., None] if array.ndim == 2 else array


def resize_planes(example: Example, shape: tuple[int, int]) -> Example:
    """Resizes to ``shape`` (H, W): the image bilinearly, every mask plane nearest-neighbour only.

    Pillow's bilinear filter widens its support when shrinking (area-like, no aliasing); labels are never
    blended, so a resized mask holds only label values that existed. ``spacing`` follows the new grid.
    """
    h, w = example.mask.shape
    if tuple(shape) == (h, w):
        return example

    def resize(plane: np.ndarray, resample: Image.Resampling) -> np.ndarray:
        grey = plane.ndim == 3 and plane.shape[-1] == 1
        out = np.asarray(Image.fromarray(plane[..., 0] if grey else plane).resize(shape[::-1], resample))
        return out[..., None] if grey else out

    def nearest(plane: np.ndarray) -> np.ndarray:
        return resize(plane.astype(np.uint8), Image.Resampling.NEAREST)

    dy, dx, dz = example.spacing
    return dataclasses.replace(
        example,
        image=resize(example.image, Image.Resampling.BILINEAR),
        mask=nearest(example.mask),
        valid=None if example.valid is None else nearest(example.valid),
        spacing=(dy * h / shape[0], dx * w / shape[1], dz),
        extras={k: nearest(v) for k, v in example.extras.items()},
    )
