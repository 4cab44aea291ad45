"""3-D NIfTI segmentation datasets read with nibabel and stored as 2-D slices, in three download layouts.

``layout`` picks the archive:

* ``'synapse'``: Synapse multi-organ CT (BTCV), ``RawData/Training/img/img0001.nii.gz`` with
  ``RawData/Training/label/label0001.nii.gz``. The split is the one of TransUNet (Chen et al. 2021) that
  later 2-D papers reuse: 18 training cases and 12 test cases (:data:`SYNAPSE_TRAIN`, :data:`SYNAPSE_TEST`).
  The raw 13 labels become TransUNet's 8 organs (:data:`SYNAPSE_ORGANS`, as in mmsegmentation's converter):
  raw 8 aorta -> 1, 4 gallbladder -> 2, 3 left kidney -> 3, 2 right kidney -> 4, 6 liver -> 5,
  11 pancreas -> 6, 1 spleen -> 7, 7 stomach -> 8; the other 5 structures become background.
* ``'acdc'``: ACDC cine MRI, ``training/patientNNN/patientNNN_frameMM.nii.gz`` with ``..._gt.nii.gz``
  (100 patients) and ``testing/patientNNN/...`` (50 patients, the test split); labels 1 RV, 2 MYO, 3 LV.
  Each annotated frame (end-diastole, end-systole) is one volume (``case_id``); splits go by patient.
* ``'msd'``: Medical Segmentation Decathlon / nnU-Net raw data, ``dataset.json`` + ``imagesTr/`` +
  ``labelsTr/``. Class names come from ``labels`` (MSD ``{"0": "background", ...}`` or nnU-Net v2
  ``{"background": 0, ...}``), cases from ``training`` (MSD) or from the file names (nnU-Net v2:
  ``imagesTr/<case>_0000<file_ending>``). Test images have no labels, so every split is drawn from the
  training cases by ``split_fractions``, by case, with ``seed``.

Slicing: volumes are cut along their third voxel axis (axial for CT, short axis for ACDC) in stored voxel
order, no reorientation; each slice is transposed so that rows follow the second voxel axis; ``spacing``
holds (dy, dx, dz) in mm after resampling. Intensities become uint8 by ``intensity``: 'window' clips to
``window`` (CT HU, default TransUNet's [-125, 275]) and 'percentile' rescales each volume's
``percentiles`` (MRI, default 0.5-99.5 %); the layout picks when ``intensity`` is ''. In-plane resampling
(``resample``): 'none' keeps the voxel grid, 'size' resizes every slice to ``image_size`` square (as
TransUNet's 224), 'spacing' to ``target_spacing`` mm; images bilinearly, labels nearest-neighbour only.
``slices='foreground'`` keeps only labelled slices in train and validation (test always keeps every slice,
so volume metrics see whole cases). Validation is carved by case from the training cases
(``validation_fraction``; 0 leaves the split out). An image and label whose shapes or affines differ stop
preparation with an error naming both files.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from medjax.data import splits
from medjax.data.builders import _segmentation as seg
from medjax.data.builders._folder import DatasetLayoutError, is_junk

SYNAPSE_TRAIN = (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)
SYNAPSE_TEST = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)
SYNAPSE_ORGANS = (
    "aorta",
    "gallbladder",
    "left_kidney",
    "right_kidney",
    "liver",
    "pancreas",
    "spleen",
    "stomach",
)
SYNAPSE_RAW_TO_ORGAN = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
ACDC_CLASSES = ("background", "RV", "MYO", "LV")
LAYOUTS = {
    "synapse": "<manual_dir>/[RawData/][Training/]img/img0001.nii.gz + label/label0001.nii.gz",
    "acdc": "<manual_dir>/[database/]{training,testing}/patientNNN/patientNNN_frameMM.nii.gz + _gt.nii.gz",
    "msd": "<manual_dir>/[TaskXX_Name/]dataset.json + imagesTr/<case>.nii.gz + labelsTr/<case>.nii.gz",
}
_DEFAULT_INTENSITY = {"synapse": "window", "acdc": "percentile", "msd": "percentile"}


@dataclasses.dataclass(eq=False)
class NiftiConfig(tfds.core.BuilderConfig):
    """Options of ``nifti_volumes`` (module docstring)."""

    layout: str = "msd"
    root: str = ""
    intensity: str = ""
    window: tuple[float, float] = (-125.0, 275.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    resample: str = "none"
    image_size: int = 224
    target_spacing: tuple[float, float] = (1.0, 1.0)
    slices: str = "all"
    channel: int = 0
    validation_fraction: float = 0.1
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0

    def __post_init__(self):
        seg.coerce_fields(self)
        checks = [
            (self.layout in LAYOUTS, f"layout must be one of {sorted(LAYOUTS)}"),
            (
                self.intensity in ("", "window", "percentile"),
                "intensity must be '', 'window' or 'percentile'",
            ),
            (self.resample in ("none", "size", "spacing"), "resample must be 'none', 'size' or 'spacing'"),
            (self.slices in ("all", "foreground"), "slices must be 'all' or 'foreground'"),
            (0.0 <= self.validation_fraction < 1.0, "validation_fraction must be in [0, 1)"),
            (self.window[0] < self.window[1], "window must be (low, high) with low < high"),
        ]
        seg.check_options("nifti_volumes", checks)


@dataclasses.dataclass(frozen=True)
class Volume:
    """One image/label pair: ``case_id`` names the volume, ``group`` what splits keep together (patient)."""

    case_id: str
    group: str
    image: Path
    label: Path
    official: str


class NiftiVolumes(tfds.core.GeneratorBasedBuilder):
    """Synapse, ACDC or MSD/nnU-Net volumes as 2-D slices (``layout``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list[NiftiConfig]] = [NiftiConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Unpack the archive under manual_dir in the layout of config.layout:\n" + (
        "\n".join(f"  {name}: {text}" for name, text in LAYOUTS.items())
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=seg.features(1),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # Slices stay in (case, slice) order, so cases reassemble in order.
        )

    def _error(self, message: str) -> DatasetLayoutError:
        layout = self.builder_config.layout
        return DatasetLayoutError(f"nifti_volumes ({layout}): {message}\nExpected layout: {LAYOUTS[layout]}")

    def _split_generators(self, dl_manager):
        config = self.builder_config
        root = Path(dl_manager.manual_dir) / config.root
        reader = {"synapse": self._synapse, "acdc": self._acdc, "msd": self._msd}[config.layout]
        volumes, class_names, mapping = reader(root)
        for volume in volumes:
            self._check_pair(volume)
        assignment = self._assign(volumes)
        stats = seg.SegmentationStats(self.info.metadata, class_names, layout=config.layout)
        by_split = {s: [v for v, a in zip(volumes, assignment, strict=True) if a == s] for s in splits.SPLITS}
        self.info.metadata["cases"] = {s: [v.case_id for v in vs] for s, vs in by_split.items()}
        return {s: self._generate_examples(s, vs, mapping, stats) for s, vs in by_split.items() if vs}

    def _assign(self, volumes: list[Volume]) -> list[str]:
        """Official splits kept; validation carved by group (patient) from train, or all drawn for MSD."""
        config = self.builder_config
        groups = [v.group for v in volumes]
        official = [v.official for v in volumes]
        if config.layout == "msd":
            plan = splits.plan_splits(
                labels=[0] * len(volumes),
                hashes=groups,
                fractions=dict(zip(splits.SPLITS, config.split_fractions, strict=True)),
                seed=config.seed,
            )
        else:
            plan = splits.plan_splits(
                labels=[0] * len(volumes),
                hashes=groups,
                official=official,
                validation_fraction=config.validation_fraction or None,
                min_validation=1,
                seed=config.seed,
            )
        return list(plan.assignment)

    # Layouts ---------------------------------------------------------------------------------------

    def _find(self, root: Path, marker: str) -> Path:
        """``root`` or the shallowest folder below it (3 levels at most) containing ``marker``."""
        level = [root]
        for _ in range(4):
            for folder in level:
                if (folder / marker).exists():
                    return folder
            level = [p for f in level if f.is_dir() for p in sorted(f.iterdir()) if p.is_dir()]
        raise self._error(f"no {marker} found under {root}")

    def _synapse(self, root: Path) -> tuple[list[Volume], tuple[str, ...], dict]:
        base = self._find(root, "label")  # RawData/Testing/img has no labels.
        volumes, missing = [], []
        for split, cases in (("train", SYNAPSE_TRAIN), ("test", SYNAPSE_TEST)):
            for case in cases:
                image, label = (
                    base / "img" / f"img{case:04d}.nii.gz",
                    base / "label" / f"label{case:04d}.nii.gz",
                )
                missing += [str(p) for p in (image, label) if not p.is_file()]
                volumes.append(Volume(f"case{case:04d}", f"case{case:04d}", image, label, split))
        if missing:
            raise self._error(f"missing {len(missing)} file(s) of the 18/12 case list, e.g. {missing[:3]}")
        return volumes, ("background", *SYNAPSE_ORGANS), SYNAPSE_RAW_TO_ORGAN

    def _acdc(self, root: Path) -> tuple[list[Volume], tuple[str, ...], dict | None]:
        base = self._find(root, "training")
        volumes = []
        for folder, split in (("training", "train"), ("testing", "test")):
            patients = sorted(p for p in (base / folder).glob("patient*") if p.is_dir())
            if not patients:
                raise self._error(f"no patientNNN folders in {base / folder}")
            for patient in patients:
                labels = sorted(patient.glob(f"{patient.name}_frame*_gt.nii*"))
                if not labels:
                    raise self._error(f"{patient} has no {patient.name}_frameMM_gt.nii.gz")
                for label in labels:
                    image = label.with_name(label.name.replace("_gt", ""))
                    if not image.is_file():
                        raise self._error(f"{label} has no image {image.name}")
                    case = label.name.split("_gt")[0]
                    volumes.append(Volume(case, patient.name, image, label, split))
        return volumes, ACDC_CLASSES, None

    def _msd(self, root: Path) -> tuple[list[Volume], tuple[str, ...], dict | None]:
        base = self._find(root, "dataset.json")
        meta = json.loads((base / "dataset.json").read_text())
        labels = meta.get("labels")
        if not isinstance(labels, dict) or not labels:
            raise self._error(f"{base / 'dataset.json'} has no 'labels' mapping")
        try:
            # MSD maps "0" -> name; nnU-Net v2 maps name -> 0.
            pairs = (
                {int(k): v for k, v in labels.items()}
                if str(next(iter(labels))).isdigit()
                else {int(v): k for k, v in labels.items()}
            )
        except (TypeError, ValueError) as e:
            raise self._error(f"labels in dataset.json must map integers and names ({labels}): {e}") from e
        if sorted(pairs) != list(range(len(pairs))):
            raise self._error(f"dataset.json labels must be 0..K-1, got {sorted(pairs)}")
        names = tuple(pairs[k] for k in range(len(pairs)))
        if "training" in meta:
            entries = [(base / e["image"], base / e["label"]) for e in meta["training"]]
        else:
            ending = meta.get("file_ending", ".nii.gz")
            channel = f"_{self.builder_config.channel:04d}{re.escape(ending)}$"
            entries = [
                (p, base / "labelsTr" / re.sub(channel, ending, p.name))
                for p in sorted((base / "imagesTr").glob(f"*_{self.builder_config.channel:04d}{ending}"))
                if not is_junk(p.name)  # MSD tarballs carry macOS '._*' twins of every volume.
            ]
        if not entries:
            raise self._error(f"no training cases listed in {base / 'dataset.json'} or found in imagesTr/")
        volumes = []
        for image, label in entries:
            missing = [str(p) for p in (image, label) if not p.is_file()]
            if missing:
                raise self._error(f"dataset.json lists missing file(s) {missing}")
            case = label.name.split(".")[0]
            volumes.append(Volume(case, case, image, label, "train"))
        return volumes, names, None

    # Volumes -> slices -------------------------------------------------------------------------------

    def _check_pair(self, volume: Volume) -> None:
        import nibabel as nib  # Imported lazily: only volume datasets need it.

        image, label = nib.load(volume.image), nib.load(volume.label)
        if image.shape[:3] != label.shape[:3]:
            raise self._error(
                f"image {volume.image} has shape {image.shape} but label {volume.label} has {label.shape}"
            )
        if not np.allclose(image.affine, label.affine, atol=1e-3):
            raise self._error(
                f"image {volume.image} and label {volume.label} have different affines (voxel-to-world):\n"
                f"{np.round(image.affine, 4)}\nvs\n{np.round(label.affine, 4)}"
            )

    def _generate_examples(self, split: str, volumes: list[Volume], mapping: dict | None, stats):
        config = self.builder_config
        for volume in volumes:
            image, labels, zooms = self._load(volume, mapping)
            keep_empty = config.slices == "all" or split == "test"
            for k in range(image.shape[2]):
                mask = np.ascontiguousarray(labels[:, :, k].T)
                if not keep_empty and not mask.any():
                    continue
                example = self._resample(
                    seg.Example(
                        id=f"{volume.case_id}_slice{k:03d}",
                        image=np.ascontiguousarray(image[:, :, k].T)[..., None],
                        mask=mask,
                        case_id=volume.case_id,
                        slice_index=k,
                        spacing=(zooms[1], zooms[0], zooms[2]),
                    )
                )
                yield example.id, stats.add(split, example)

    def _load(self, volume: Volume, mapping: dict | None) -> tuple[np.ndarray, np.ndarray, tuple]:
        """(uint8 image volume, uint8 label volume, voxel sizes) of one case."""
        import nibabel as nib

        config = self.builder_config
        image_nii = nib.load(volume.image)
        data = np.asarray(image_nii.dataobj, dtype=np.float32)
        if data.ndim == 4:
            data = data[..., config.channel]
        raw = np.asarray(nib.load(volume.label).dataobj)
        if raw.ndim != 3 or not np.array_equal(raw, np.round(raw)) or raw.min() < 0 or raw.max() > 255:
            raise self._error(f"label {volume.label}: expected a 3-D volume of integer labels 0..255")
        labels = seg.apply_mapping(raw.astype(np.uint8), mapping)  # Unmapped raw labels become background.
        zooms = tuple(float(z) for z in image_nii.header.get_zooms()[:3])
        return volume_to_uint8(data, config), labels, zooms

    def _resample(self, example: seg.Example) -> seg.Example:
        config = self.builder_config
        if config.resample == "size":
            return seg.resize_planes(example, (config.image_size, config.image_size))
        if config.resample == "spacing":
            (h, w), (dy, dx, _) = example.mask.shape, example.spacing
            ty, tx = config.target_spacing
            return seg.resize_planes(example, (max(1, round(h * dy / ty)), max(1, round(w * dx / tx))))
        return example


def volume_to_uint8(data: np.ndarray, config: NiftiConfig) -> np.ndarray:
    """A float intensity volume as uint8 by the config's ``intensity`` rule (the layout's default when
    ''): 'window' clips to ``window``, 'percentile' rescales the volume's ``percentiles``. Prediction on
    new volumes (:mod:`medjax.seg_predict`) applies the same rule."""
    mode = config.intensity or _DEFAULT_INTENSITY[config.layout]
    low, high = config.window if mode == "window" else np.percentile(data, config.percentiles)
    scaled = np.clip((data - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


Builder = NiftiVolumes
Config = NiftiConfig
