"""Large COVID-19 CT scan slice dataset (Maftouni et al. 2021): about 17,104 slices, 3 classes.

The Kaggle release nests its folders (``curated_data/curated_data/1NonCOVID, 2COVID, 3CAP``); the root is
found automatically and the numeric prefixes are accepted as aliases. No official split: seeded stratified
70/10/20, duplicates never straddle. Label order: 0 = Normal, 1 = COVID, 2 = CAP (community-acquired
pneumonia).
"""

from __future__ import annotations

from typing import ClassVar

from medjax.data.builders._folder import FolderBuilder, FolderConfig, ImageConfig

LAYOUT = """\
  <manual_dir>/[any wrapper folders/]{Normal|NonCOVID|1NonCOVID}/*.png
  <manual_dir>/[any wrapper folders/]{COVID|2COVID}/*.png
  <manual_dir>/[any wrapper folders/]{CAP|3CAP}/*.png"""


class CovidCtSlices(FolderBuilder):
    """Maftouni's curated COVID / Normal / CAP CT slices."""

    name = "covid_ct_slices"
    BUILDER_CONFIGS: ClassVar[list[ImageConfig]] = [FolderConfig(name="default")]
    CLASS_FOLDERS: ClassVar[dict[str, tuple[str, ...]]] = {
        "Normal": ("NonCOVID", "non-COVID", "1NonCOVID"),
        "COVID": ("2COVID", "COVID-19"),
        "CAP": ("3CAP",),
    }
    LAYOUT = LAYOUT
    DESCRIPTION = __doc__
    HOMEPAGE = "https://www.kaggle.com/datasets/maedemaftouni/large-covid19-ct-slice-dataset"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the "Large COVID-19 CT scan slice dataset" (Maftouni et al. 2021) from {HOMEPAGE}, unzip it and
point manual_dir at the extracted folder. Expected layout:
{LAYOUT}"""


Builder = CovidCtSlices
Config = FolderConfig
