"""Kermany pediatric chest X-ray (Kaggle "Chest X-Ray Images (Pneumonia)"): NORMAL vs PNEUMONIA.

The official train/test split is kept. The official ``val/`` folder holds only 16 images (and is missing
from many copies), so when validation is absent or tiny it is merged into train and a stratified
validation split is carved out of train: 20 % by default, the 80/20 train/validation split of study C
(``validation_fraction`` changes it). The Kaggle zip nests a second copy (``chest_xray/chest_xray``) and a
``__MACOSX`` folder; both are ignored (and reported). Label order: 0 = NORMAL, 1 = PNEUMONIA.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from medjax.data.builders._folder import FolderBuilder, FolderConfig, ImageConfig

LAYOUT = """\
  <manual_dir>/[chest_xray/]train/{NORMAL,PNEUMONIA}/*.jpeg
  <manual_dir>/[chest_xray/]test/{NORMAL,PNEUMONIA}/*.jpeg
  <manual_dir>/[chest_xray/]val/{NORMAL,PNEUMONIA}/*.jpeg   (optional)"""


@dataclasses.dataclass(eq=False)
class ChestXrayConfig(FolderConfig):
    """Study C validates on 20 % of train."""

    validation_fraction: float = 0.2


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
