"""Generic folder-of-class-folders dataset: any ``<root>/<class>/*`` or ``<root>/<split>/<class>/*`` tree.

Class names are the folder names, sorted (label k = k-th name), unless ``classes`` fixes the order (then
folders are matched ignoring case, spaces, '-' and '_'). ``root`` is a sub-folder of manual_dir where the
search starts, for archives holding several datasets. Split folders (train|training, val|valid|validation,
test|testing) are kept as official splits; otherwise a seeded stratified 70/10/20 split is drawn.

``unlabelled=True`` reads every image below ``root`` (sub-folders included, whatever their names) as one
class ``image``, split by ``split_fractions``: the pool of a pretraining run (:mod:`medjax.tasks.pretrain`),
e.g. ``split_fractions=(0.9, 0.1, 0.0)`` to keep a tenth for the validation loss and no test split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from medjax.data.builders._folder import FolderBuilder, FolderConfig, ImageConfig

LAYOUT = """\
  <manual_dir>/<root>/<class>/*                       (no official split)
  <manual_dir>/<root>/{train,val,test}/<class>/*      (official split; val optional)
  <manual_dir>/<root>/**/*                            (unlabelled=True: any folders, one class)"""
UNLABELLED_CLASS = "image"


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(FolderConfig):
    """``root``: sub-folder of manual_dir to search; ``classes``: label order (default: sorted folders);
    ``unlabelled``: every image below ``root`` is one class (see the module docstring)."""

    root: str = ""
    classes: tuple[str, ...] = ()
    unlabelled: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.unlabelled and self.classes:
            raise ValueError("classes names label folders; an unlabelled image folder has none (unset one).")


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
        if self.builder_config.unlabelled:
            return {UNLABELLED_CLASS: ()}
        return {name: () for name in self.builder_config.classes} or None

    def _locate(self, manual_dir: Path) -> tuple[Path, dict, dict]:
        if not self.builder_config.unlabelled:
            return super()._locate(manual_dir)
        root = self.search_root(manual_dir)
        if not root.is_dir():
            raise self._layout_error(f"{root} is not a directory")
        return root, {None: root}, {None: {UNLABELLED_CLASS: root}}

    def search_root(self, manual_dir: Path) -> Path:
        root = (manual_dir / self.builder_config.root).resolve()
        if not root.is_relative_to(manual_dir.resolve()):
            raise self._layout_error(f"root {self.builder_config.root!r} leaves manual_dir {manual_dir}")
        return root


Builder = ImageFolder
Config = ImageFolderConfig
