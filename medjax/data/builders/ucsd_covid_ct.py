"""UCSD-AI4H COVID-CT (Zhao et al. 2020): CT slices of COVID-19 and non-COVID patients, official split.

The release ships the images (``Images-processed/CT_COVID``, ``Images-processed/CT_NonCOVID``) and split
lists (``Data-split/COVID/{train,val,test}CT_COVID.txt``, ``Data-split/NonCOVID/...``); laid out by those
lists as ``{train,val,test}/{CT_COVID,CT_NonCOVID}/*``, the official split is kept as it is: train 191 /
234, val 60 / 58, test 98 / 105 (COVID / non-COVID), the split its published baselines report on. Slices
come from preprint figures: PNG and JPEG, RGB, RGBA or grey, 53 to 1408 px wide; each is decoded to the
configured channels and resized (``resize``). Label order: 0 = CT_NonCOVID, 1 = CT_COVID (the positive
class of the binary metrics).

Every COVID slice is a PNG while half the non-COVID ones are JPEGs, in every split: a model can score by
compression artefacts. Mind it when reading results.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from medjax.data.builders._folder import FolderBuilder, FolderConfig, ImageConfig

LAYOUT = """\
  <manual_dir>/[any wrapper folder/]train/{CT_COVID,CT_NonCOVID}/*.{png,jpg}
  <manual_dir>/[any wrapper folder/]val/{CT_COVID,CT_NonCOVID}/*.{png,jpg}
  <manual_dir>/[any wrapper folder/]test/{CT_COVID,CT_NonCOVID}/*.{png,jpg}"""


@dataclasses.dataclass(eq=False)
class UcsdCovidCtConfig(FolderConfig):
    """The official validation split is kept whatever its size (it is what published results select on)."""

    min_validation: int = 1


class UcsdCovidCt(FolderBuilder):
    """UCSD-AI4H COVID-CT, 349 COVID and 397 non-COVID slices in the official train/val/test split."""

    name = "ucsd_covid_ct"
    BUILDER_CONFIGS: ClassVar[list[ImageConfig]] = [UcsdCovidCtConfig(name="default")]
    CLASS_FOLDERS: ClassVar[dict[str, tuple[str, ...]]] = {"CT_NonCOVID": (), "CT_COVID": ()}
    LAYOUT = LAYOUT
    DESCRIPTION = __doc__
    HOMEPAGE = "https://github.com/UCSD-AI4H/COVID-CT"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the UCSD-AI4H COVID-CT release from {HOMEPAGE}: unzip Images-processed/CT_COVID.zip and
CT_NonCOVID.zip, then copy each file named in Data-split/COVID/{{train,val,test}}CT_COVID.txt and
Data-split/NonCOVID/{{train,val,test}}CT_NonCOVID.txt into the matching folder below, and point
manual_dir at it. Expected layout:
{LAYOUT}"""


Builder = UcsdCovidCt
Config = UcsdCovidCtConfig
