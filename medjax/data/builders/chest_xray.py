"""Kermany pediatric chest X-ray (Kaggle "Chest X-Ray Images (Pneumonia)"): NORMAL vs PNEUMONIA.

The official train/test split is kept. The official ``val/`` folder holds only 16 images (and is missing
from many copies), so when validation is absent or tiny it is merged into train and a stratified
validation split is carved out of train: 20 % by default, the 80/20 train/validation split of study C
(``validation_fraction`` changes it). The Kaggle zip nests a second copy (``chest_xray/chest_xray``) and a
``__MACOSX`` folder; both are ignored (and reported). Label order: 0 = NORMAL, 1 = PNEUMONIA.

Patients: most children have several radiographs (1,005 of the 1,635 ``personN`` keys in the pneumonia
training folder, 70 of the 1,211 normal ``IM-NNNN`` keys), so a per-image carve would put one child in
train and validation, and validation would overstate test. ``group_pattern`` (default
:data:`PATIENT_PATTERN`) keeps each child on one side: ``person1234`` for pneumonia files
(``person1234_bacteria_5678.jpeg``) and ``IM-0123`` / ``NORMAL2-IM-0123`` for normal ones
(``IM-0123-0001-0002.jpeg``). The key is coarser than a child where the archive is ambiguous:
``personN`` numbers bacterial and viral cases alike (979 keys carry both kinds), and the official test
folder reuses 170 training keys, always with the other infection type, so the preparation report's
``straddling_patients`` for the official train/test split counts key reuse, not proven leaks; the
near-duplicate search finds no image shared across them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from medjax.data.builders._folder import FolderBuilder, FolderConfig, ImageConfig

LAYOUT = """\
  <manual_dir>/[chest_xray/]train/{NORMAL,PNEUMONIA}/*.jpeg
  <manual_dir>/[chest_xray/]test/{NORMAL,PNEUMONIA}/*.jpeg
  <manual_dir>/[chest_xray/]val/{NORMAL,PNEUMONIA}/*.jpeg   (optional)"""


# One child per key: person<N> (pneumonia) or [NORMAL<k>-]IM-<N> (normal), searched in the relative path.
PATIENT_PATTERN = r"(person\d+)_|((?:NORMAL\d+-)?IM-\d+)-"


@dataclasses.dataclass(eq=False)
class ChestXrayConfig(FolderConfig):
    """Study C validates on 20 % of train; patients never straddle it."""

    validation_fraction: float = 0.2
    group_pattern: str = PATIENT_PATTERN


class ChestXray(FolderBuilder):
    """Kermany et al. 2018 pediatric chest X-rays (5,856 JPEGs)."""

    name = "chest_xray"
    BUILDER_CONFIGS: ClassVar[list[ImageConfig]] = [ChestXrayConfig(name="default")]
    CLASS_FOLDERS: ClassVar[dict[str, tuple[str, ...]]] = {"NORMAL": (), "PNEUMONIA": ()}
    LAYOUT = LAYOUT
    DESCRIPTION = __doc__
    HOMEPAGE = "https://data.mendeley.com/datasets/rscbjbr9sj/2"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download "Chest X-Ray Images (Pneumonia)" (Kermany et al. 2018, CC BY 4.0) from {HOMEPAGE} or Kaggle
(paultimothymooney/chest-xray-pneumonia), unzip it and point manual_dir at the extracted folder.
Expected layout:
{LAYOUT}"""


Builder = ChestXray
Config = ChestXrayConfig
