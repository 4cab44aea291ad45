"""Brain tumour MRI classification: the 4-class Kaggle set or the binary yes/no set.

``variant='four_class'`` (default) expects ``Training/`` and ``Testing/`` folders (kept as the official
train/test split; validation is carved from Training) with glioma / meningioma / notumor / pituitary
class folders; the older ``*_tumor`` / ``no_tumor`` folder names are accepted. Label order is alphabetical:
0 = glioma, 1 = meningioma, 2 = notumor, 3 = pituitary.
``variant='binary'`` expects ``no/`` and ``yes/`` (0 = no tumour, 1 = tumour) and draws a seeded
stratified 70/10/20 split. Study A's dataset is a 4-class brain MRI set.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from medjax.data.builders._folder import FolderBuilder, FolderConfig, ImageConfig

VARIANTS = {
    "four_class": {
        "glioma": ("glioma_tumor",),
        "meningioma": ("meningioma_tumor",),
        "notumor": ("no_tumor",),
        "pituitary": ("pituitary_tumor",),
    },
    "binary": {"no": (), "yes": ()},
}
LAYOUT = """\
  variant='four_class':
    <manual_dir>/[wrapper/]Training/{glioma,meningioma,notumor|no_tumor,pituitary}/*.jpg
    <manual_dir>/[wrapper/]Testing/{glioma,meningioma,notumor|no_tumor,pituitary}/*.jpg
  variant='binary':
    <manual_dir>/[wrapper/]{no,yes}/*.jpg"""


@dataclasses.dataclass(eq=False)
class BrainMriConfig(FolderConfig):
    """``variant``: 'four_class' or 'binary' (decides the label names, so it is part of the config)."""

    variant: str = "four_class"

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")


class BrainMri(FolderBuilder):
    """Brain tumour MRI slices (JPEG, various sizes)."""

    name = "brain_mri"
    BUILDER_CONFIGS: ClassVar[list[ImageConfig]] = [BrainMriConfig(name="default")]
    LAYOUT = LAYOUT
    DESCRIPTION = __doc__
    HOMEPAGE = "https://www.kaggle.com/datasets/masoudnickparvar/brain-tumor-mri-dataset"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the "Brain Tumor MRI Dataset" (4 classes) from {HOMEPAGE}, or the binary "Brain MRI Images for
Brain Tumor Detection" (navoneel/brain-mri-images-for-brain-tumor-detection), unzip it and point manual_dir
at the extracted folder. Expected layout:
{LAYOUT}"""

    def class_folders(self) -> dict[str, tuple[str, ...]]:
        return VARIANTS[self.builder_config.variant]


Builder = BrainMri
Config = BrainMriConfig
