"""Generic folder-of-class-folders dataset: any ``<root>/<class>/*`` or ``<root>/<split>/<class>/*`` tree.

Class names are the folder names, sorted (label k = k-th name), unless ``classes`` fixes the order (then
folders are matched ignoring case, spaces, '-' and '_'). ``root`` is a sub-folder of manual_dir where the
search starts, for archives holding several datasets. Split folders (train|training, val|valid|validation,
test|testing) are kept as official splits; otherwise a seeded stratified 70/10/20 split is drawn.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from medjax.data.builders._folder import FolderBuilder, FolderConfig, ImageConfig

LAYOUT = """\
  <manual_dir>/<root>/<class>/*                       (no official split)
  <manual_dir>/<root>/{train,val,test}/<class>/*      (official split; val optional)"""


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(FolderConfig):
    """``root``: sub-folder of manual_dir to search; ``classes``: label order (default: sorted folders)."""

    root: str = ""
    classes: tuple[str, ...] = ()


class ImageFolder(FolderBuilder):
    """Any image classification tree; class names decided at preparation unless ``classes`` is set."""

    name = "image_folder"
    BUILDER_CONFIGS: ClassVar[list[ImageConfig]] = [ImageFolderConfig(name="default")]
    LAYOUT = LAYOUT
    DESCRIPTION = __doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put the images under manual_dir, one folder per class. Expected layout:
{LAYOUT}"""

    def class_folders(self) -> dict[str, tuple[str, ...]] | None:
        return {name: () for name in self.builder_config.classes} or None

    def search_root(self, manual_dir: Path) -> Path:
        root = (manual_dir / self.builder_config.root).resolve()
        if not root.is_relative_to(manual_dir.resolve()):
            raise self._layout_error(f"root {self.builder_config.root!r} leaves manual_dir {manual_dir}")
        return root


Builder = ImageFolder
Config = ImageFolderConfig
