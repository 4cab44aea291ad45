"""MedMNIST v2 2-D subsets from their official ``.npz`` files (any size: 28, 64, 128 or 224).

Keys ``{train,val,test}_images`` (N, H, W) grey or (N, H, W, 3) RGB uint8, and ``{train,val,test}_labels``
shaped (N,) or (N, 1) (copies differ; both are accepted). The official split is kept exactly, because the
published baselines are on it; pixel-identical images that straddle splits (PneumoniaMNIST has 8 such
train/val groups, BreastMNIST one train/test group with conflicting labels) are counted in the
preparation report, or removed with ``drop_duplicates=True`` (which changes the official counts).
Multi-label subsets (ChestMNIST, labels (N, 14)) are rejected: ``label`` here is a single class.
Label names follow the MedMNIST ``INFO`` table for known subsets, else ``class_<k>``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import numpy as np

from medjax.data import images
from medjax.data.builders._folder import DatasetLayoutError, ImageConfig, MedicalImageBuilder, Record

_ORGANS = (
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
    "liver", "lung-left", "lung-right", "pancreas", "spleen",
)  # fmt: skip
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "pneumoniamnist": ("normal", "pneumonia"),
    "breastmnist": ("malignant", "normal, benign"),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pathmnist": (
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
        "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium",
    ),
    "dermamnist": (
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions",
    ),
    "bloodmnist": (
        "basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte", "monocyte",
        "neutrophil", "platelet",
    ),
    "organamnist": _ORGANS,
    "organcmnist": _ORGANS,
    "organsmnist": _ORGANS,
}  # fmt: skip
_SPLIT_KEYS = {"train": "train", "val": "validation", "test": "test"}
LAYOUT = """\
  <manual_dir>/<subset>.npz  or  <manual_dir>/<subset>/<subset>.npz  (or the path given as npz=...)
  with keys {train,val,test}_images and {train,val,test}_labels"""


@dataclasses.dataclass(eq=False)
class MedMnistConfig(ImageConfig):
    """``subset``: MedMNIST name (label names); ``npz``: file name or path relative to manual_dir."""

    image_size: int = 28
    channels: int = 1
    subset: str = "pneumoniamnist"
    npz: str = ""


class MedMnist(MedicalImageBuilder):
    """A 2-D MedMNIST subset with its official train/val/test split."""

    name = "medmnist"
    BUILDER_CONFIGS: ClassVar[list[ImageConfig]] = [MedMnistConfig(name="default")]
    DESCRIPTION = __doc__
    HOMEPAGE = "https://medmnist.com/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the subset's .npz from {HOMEPAGE} (Zenodo record 10519652), e.g. pneumoniamnist.npz, and put it
in manual_dir. Expected layout:
{LAYOUT}"""

    def class_names(self) -> tuple[str, ...] | None:
        return LABEL_NAMES.get(self.builder_config.subset)

    def _split_options(self) -> dict:
        return {**super()._split_options(), "validation_fraction": None}  # Official val is never carved.

    def _error(self, message: str) -> DatasetLayoutError:
        return DatasetLayoutError(f"{self.name}: {message}\nExpected layout:\n{LAYOUT}")

    def _npz_path(self, manual_dir: Path) -> Path:
        config = self.builder_config
        names = (
            [config.npz] if config.npz else [f"{config.subset}.npz", f"{config.subset}/{config.subset}.npz"]
        )
        for path in (manual_dir / name for name in names):
            if path.is_file():
                return path
        raise self._error(f"no npz file at {', '.join(str(manual_dir / n) for n in names)}")

    def _collect(self, manual_dir: Path, store) -> tuple[list, list, dict]:
        path = self._npz_path(manual_dir)
        with np.load(path) as data:
            missing = [
                f"{s}_{k}" for s in _SPLIT_KEYS for k in ("images", "labels") if f"{s}_{k}" not in data
            ]
            if missing:
                raise self._error(f"{path} lacks keys {missing}")
            arrays = {
                s: (data[f"{s}_images"], self._labels(data[f"{s}_labels"], path, s)) for s in _SPLIT_KEYS
            }
        highest = max(int(labels.max(initial=0)) for _, labels in arrays.values())
        names = self.class_names() or tuple(f"class_{k}" for k in range(highest + 1))
        if highest >= len(names):
            raise self._error(
                f"{path}: label {highest}, but {self.builder_config.subset!r} has classes {names}"
            )
        spec, records = self.image_spec(), []
        for split, (pixels, labels) in arrays.items():
            if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or len(pixels) != len(labels):
                raise self._error(
                    f"{path}: {split}_images must be uint8 (N,H,W) or (N,H,W,3) with one row per label "
                    f"({len(labels)}), got {pixels.dtype} {pixels.shape}"
                )
            for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
                png, digest, fingerprint = images.prepare_array(image, spec)
                item_id = f"{split}/{i:06d}"
                records.append(
                    Record(item_id, int(label), _SPLIT_KEYS[split], *store(png), digest, fingerprint)
                )
        return records, list(names), {"source": str(path)}

    def _labels(self, labels: np.ndarray, path: Path, split: str) -> np.ndarray:
        """Accepts (N,) and (N, 1); a wider second axis means a multi-label subset such as chestmnist."""
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise self._error(
                f"{path}: {split}_labels has shape {labels.shape}: {labels.shape[1]} labels per image "
                "(multi-label subset, e.g. chestmnist); medjax builders need one class per image"
            )
        if labels.ndim not in (1, 2):
            raise self._error(f"{path}: {split}_labels must be (N,) or (N, 1), got {labels.shape}")
        return labels.reshape(-1).astype(np.int64)


Builder = MedMnist
Config = MedMnistConfig
