"""DRIVE retinal vessel segmentation (Staal et al. 2004) from its official layout.

40 RGB fundus photographs of 565x584 px: ``training`` (images 21-40) and ``test`` (01-20). Conventions
of the field, followed here: the **1st observer** (``1st_manual``) is the label; the **field-of-view mask**
(``mask/``) is stored as ``valid`` so that losses and metrics ignore the black border; the **2nd
observer** (``test/2nd_manual``, a palette GIF whose indices are 0/1) is stored as ``second_observer`` so
that evaluation can score it against the 1st observer as the human level (it exists for the test split
only; other splits hold zeros, and ``metadata.json`` lists ``second_observer_splits: ['test']``).

DRIVE has no validation split: ``num_validation`` of the 20 training images (default 4) are drawn with
``numpy.random.default_rng(seed)`` and moved to 'validation'; ``num_validation=0`` keeps all 20 for
training. For cross-validation (``launch/cross_validate.py``), ``cv_folds`` >= 2 instead cuts the same
seeded order of the 20 training images into that many folds of near-equal size and makes fold ``cv_fold``
the validation split (``num_validation`` is then unused; 5 folds hold 4 images each, the recipe's
validation size). Every DRIVE image is a different subject, so folds of images are folds of patients.
Images stay at native resolution unless ``image_size`` resizes them (masks nearest-neighbour).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from medjax.data import images
from medjax.data.builders import _segmentation as seg
from medjax.data.builders._folder import DatasetLayoutError

CLASS_NAMES = ("background", "vessel")
LAYOUT = """\
  <manual_dir>/[DRIVE/]training/images/NN_training.tif       (NN = 21..40)
  <manual_dir>/[DRIVE/]training/1st_manual/NN_manual1.gif
  <manual_dir>/[DRIVE/]training/mask/NN_training_mask.gif
  <manual_dir>/[DRIVE/]test/images/NN_test.tif               (NN = 01..20)
  <manual_dir>/[DRIVE/]test/1st_manual/NN_manual1.gif
  <manual_dir>/[DRIVE/]test/2nd_manual/NN_manual2.gif
  <manual_dir>/[DRIVE/]test/mask/NN_test_mask.gif"""


@dataclasses.dataclass(eq=False)
class DriveConfig(tfds.core.BuilderConfig):
    """``num_validation`` training images moved to validation (seeded), or with ``cv_folds`` fold
    ``cv_fold`` of the training images; ``image_size`` 0 = native."""

    image_size: int = 0
    num_validation: int = 4
    seed: int = 0
    cv_folds: int = 0
    cv_fold: int = 0

    def __post_init__(self):
        seg.coerce_fields(self)
        seg.check_options(
            "drive",
            [
                (0 <= self.num_validation < 20, f"num_validation must be 0..19, not {self.num_validation}"),
                (
                    not self.cv_folds or (2 <= self.cv_folds <= 20 and 0 <= self.cv_fold < self.cv_folds),
                    f"cv_folds must be 0 or 2..20 with 0 <= cv_fold < cv_folds, got {self.cv_folds}, "
                    f"{self.cv_fold}",
                ),
            ],
        )

    def validation_cases(self, train: list[str]) -> list[str]:
        """The training cases held out: the first ``num_validation`` of a seeded order, or its fold
        ``cv_fold`` of ``cv_folds`` near-equal consecutive parts."""
        order = [train[i] for i in np.random.default_rng(self.seed).permutation(len(train))]
        if self.cv_folds:
            return sorted(np.array_split(np.array(order), self.cv_folds)[self.cv_fold].tolist())
        return sorted(order[: self.num_validation])


class Drive(tfds.core.GeneratorBasedBuilder):
    """DRIVE, official layout, 1st observer as label, FOV as ``valid``, 2nd observer kept."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list[DriveConfig]] = [DriveConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download DRIVE (https://drive.grand-challenge.org, registration needed) and unpack it under manual_dir:
{LAYOUT}"""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=seg.features(3, extra_masks=("second_observer",)),
            homepage="https://drive.grand-challenge.org",
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # Storage order = id order; training shuffles anyway.
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        root = _find_root(Path(dl_manager.manual_dir))
        train = _cases(root / "training", "training")
        test = _cases(root / "test", "test")
        if len(train) != 20 or len(test) != 20:
            raise DatasetLayoutError(
                f"drive: expected 20 training and 20 test images under {root}, found {len(train)} and "
                f"{len(test)}.\nExpected layout under manual_dir:\n{LAYOUT}"
            )
        held = config.validation_cases(train)
        stats = seg.SegmentationStats(self.info.metadata, CLASS_NAMES, second_observer_splits=["test"])
        self.info.metadata["validation_cases"] = held
        parts = {"train": [c for c in train if c not in held], "validation": held, "test": test}
        return {s: self._generate_examples(root, s, cases, stats) for s, cases in parts.items() if cases}

    def _generate_examples(self, root: Path, split: str, cases: list[str], stats: seg.SegmentationStats):
        folder, kind = (root / "test", "test") if split == "test" else (root / "training", "training")
        for case in cases:
            image = images.decode_image(folder / "images" / f"{case}_{kind}.tif", channels=3)
            label = _binary(folder / "1st_manual" / f"{case}_manual1.gif")
            fov = _binary(folder / "mask" / f"{case}_{kind}_mask.gif")
            second = folder / "2nd_manual" / f"{case}_manual2.gif"
            observer2 = _binary(second) if split == "test" else np.zeros_like(label)
            for name, plane in (("1st_manual", label), ("mask", fov), ("2nd_manual", observer2)):
                if plane.shape != image.shape[:2]:
                    shapes = f"{plane.shape} but the image is {image.shape[:2]}"
                    raise DatasetLayoutError(f"drive: {case} {name} is {shapes}")
            example = seg.Example(
                id=f"{case}_{kind}",
                image=image,
                mask=label,
                valid=fov,
                case_id=case,
                extras={"second_observer": observer2},
            )
            if size := self.builder_config.image_size:
                example = seg.resize_planes(example, (size, size))
            yield example.id, stats.add(split, example)


def _find_root(manual_dir: Path) -> Path:
    """``manual_dir`` or the first folder below it (two levels at most) holding training/ and test/."""
    level = [manual_dir]
    for _ in range(3):
        for folder in level:
            if (folder / "training").is_dir() and (folder / "test").is_dir():
                return folder
        level = [p for f in level if f.is_dir() for p in sorted(f.iterdir()) if p.is_dir()]
    raise DatasetLayoutError(f"drive: no training/ and test/ under {manual_dir}.\nExpected:\n{LAYOUT}")


def _cases(folder: Path, kind: str) -> list[str]:
    """Case numbers ('21', ...) of ``<folder>/images/NN_<kind>.tif``, checking every companion file exists."""
    cases = sorted(p.name.split("_")[0] for p in (folder / "images").glob(f"*_{kind}.tif"))
    needed = ["1st_manual/{c}_manual1.gif", f"mask/{{c}}_{kind}_mask.gif"]
    needed += ["2nd_manual/{c}_manual2.gif"] if kind == "test" else []
    paths = [folder / n.format(c=c) for c in cases for n in needed]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetLayoutError(f"drive: missing {missing[:5]} ({len(missing)} in all)\nExpected:\n{LAYOUT}")
    return cases


def _binary(path: Path) -> np.ndarray:
    """0/1 plane of a DRIVE GIF, whether it stores 0/255 grey or 0/1 palette indices."""
    plane = seg.decode_mask_file(path)
    mapping, _ = seg.label_mapping(seg.histogram(plane), "binary")
    return seg.apply_mapping(plane, mapping)


Builder = Drive
Config = DriveConfig
