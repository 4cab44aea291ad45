"""SARS-CoV-2 CT-scan dataset (Soares et al. 2020): 2,482 CT slices, COVID vs non-COVID.

The archive has no official split, so we draw a seeded, stratified 70/10/20 split in which byte-identical
(pixel-identical) slices always share a split. Label order: 0 = non-COVID, 1 = COVID (positive class last,
so ``label`` doubles as the "disease present" indicator for binary metrics).
"""

from __future__ import annotations

from typing import ClassVar

from medjax.data.builders._folder import FolderBuilder, FolderConfig, ImageConfig

LAYOUT = """\
  <manual_dir>/[any wrapper folder/]COVID/Covid (1).png ... Covid (1252).png
  <manual_dir>/[any wrapper folder/]non-COVID/Non-Covid (1).png ... Non-Covid (1230).png"""


class SarsCov2Ct(FolderBuilder):
    """SARS-CoV-2 CT-scan classification (RGB/RGBA PNG slices, 180-540 px)."""

    name = "sars_cov2_ct"
    BUILDER_CONFIGS: ClassVar[list[ImageConfig]] = [FolderConfig(name="default")]
    CLASS_FOLDERS: ClassVar[dict[str, tuple[str, ...]]] = {"non-COVID": ("noncovid",), "COVID": ("covid",)}
    LAYOUT = LAYOUT
    DESCRIPTION = __doc__
    HOMEPAGE = "https://www.kaggle.com/datasets/plameneduardo/sarscov2-ctscan-dataset"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the "SARS-COV-2 Ct-Scan Dataset" (Soares et al. 2020, CC BY 4.0) from {HOMEPAGE}, unzip it and
point manual_dir at the extracted folder. Expected layout:
{LAYOUT}"""


Builder = SarsCov2Ct
Config = FolderConfig
