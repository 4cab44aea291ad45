"""Monkeypox Skin Lesion Dataset v1 (Ali et al. 2022): 228 photos, Monkey Pox (102) vs Others (126).

The release also ships augmented copies ("Augmented Images") and 3-fold splits ("Fold1..3" folders and
CSVs). Originals are used by default: augmented copies of one photo are not pixel-identical, so the
duplicate grouping cannot keep them on one side of a random split and they would leak into test.
``use_augmented=True`` reads "Augmented Images" instead, at that risk. Fold folders and CSVs are
ignored; we draw a seeded stratified 70/10/20 split. Label order: 0 = Others, 1 = Monkey Pox.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from medjax.data.builders._folder import FolderBuilder, FolderConfig, ImageConfig, is_junk, normalise

LAYOUT = """\
  <manual_dir>/[Original Images/[Original Images/]]Monkey Pox/*.jpg
  <manual_dir>/[Original Images/[Original Images/]]Others/*.jpg
  (with use_augmented=True: Augmented Images/[Augmented Images/]{Monkeypox_augmented,Others_augmented}/)
  Fold*/ folders and *.csv files are ignored."""


@dataclasses.dataclass(eq=False)
class MonkeypoxConfig(FolderConfig):
    """``use_augmented``: read the released augmented copies instead of the originals."""

    use_augmented: bool = False


class Monkeypox(FolderBuilder):
    """Monkeypox Skin Lesion Dataset v1 (JPEG photos, 224x224)."""

    name = "monkeypox"
    BUILDER_CONFIGS: ClassVar[list[ImageConfig]] = [MonkeypoxConfig(name="default")]
    CLASS_FOLDERS: ClassVar[dict[str, tuple[str, ...]]] = {
        "Others": ("Other", "Others_augmented"),
        "Monkey Pox": ("Monkeypox_augmented",),
    }
    LAYOUT = LAYOUT
    DESCRIPTION = __doc__
    HOMEPAGE = "https://www.kaggle.com/datasets/nafin59/monkeypox-skin-lesion-dataset"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the "Monkeypox Skin Lesion Dataset" (v1) from {HOMEPAGE}, unzip it and point manual_dir at the
extracted folder. Expected layout:
{LAYOUT}"""

    def _wanted(self) -> str:
        return "augmentedimages" if self.builder_config.use_augmented else "originalimages"

    def search_root(self, manual_dir: Path) -> Path:
        """Starts at the shallowest 'Original Images' (or 'Augmented Images') folder, if there is one."""
        candidates = sorted(
            (p for p in manual_dir.rglob("*") if p.is_dir() and normalise(p.name) == self._wanted()),
            key=lambda p: (len(p.parts), str(p)),
        )
        return candidates[0] if candidates else manual_dir

    def ignore_dir(self, name: str) -> bool:
        key = normalise(name)
        unwanted = {"originalimages", "augmentedimages"} - {self._wanted()}
        return is_junk(name) or key.startswith("fold") or key in unwanted


Builder = Monkeypox
Config = MonkeypoxConfig
