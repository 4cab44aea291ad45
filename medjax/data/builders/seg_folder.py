"""Generic 2-D segmentation archive: images and masks paired by file name, configured by options only.

Two layouts, optionally inside official split folders (train|training, val|valid|validation, test|testing):

* ``layout='sibling'``: ``<root>/<image_dir>/<path>/<stem>.<ext>`` pairs with
  ``<root>/<mask_dir>/<path>/<stem><mask_suffix>.<any ext>`` (Kvasir-SEG: images/ + masks/, same names;
  ISIC 2018: ``ISIC_0000000.jpg`` + ``ISIC_0000000_segmentation.png`` with ``mask_suffix='_segmentation'``).
* ``layout='suffix'``: one tree where the mask of ``<stem>.<ext>`` is ``<stem><mask_suffix>.<any ext>`` in
  the same folder (BUSI: ``benign (1).png`` + ``benign (1)_mask.png``). Further masks of one image named
  ``<stem><mask_suffix>_<n>`` (BUSI marks a second lesion so) are an error unless ``extra_masks`` is
  'union' (merged with the first, label-wise maximum) or 'ignore'.

Images are the files matching ``image_glob`` with a PNG/JPEG/TIFF/GIF/BMP extension. Masks may be binary
(0/1, 0/255, JPEG-compressed 0/255 with ``label_mode='binary'``), palette images (the palette index is the
label), integer label maps, or colour masks mapped by ``class_colors`` (RGB triple per class); see
:func:`medjax.data.builders._segmentation.label_mapping` for ``label_mode``. An image without a mask, a
mask without an image and a mask whose size differs from its image stop preparation with an error that
names the files; ``skip_corrupt=True`` skips them instead (unreadable files too) and lists them in
``metadata.json`` under ``preparation``. Without official split folders a seeded split by
``split_fractions`` is drawn, stratified by whether a mask has foreground, duplicate images kept together.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import os
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from medjax.data import images, splits
from medjax.data.builders import _segmentation as seg
from medjax.data.builders._folder import SPLIT_FOLDERS, DatasetLayoutError, _Spill, is_junk, normalise

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp"})
LAYOUTS = ("sibling", "suffix")
EXTRA_MASKS = ("error", "union", "ignore")
LAYOUT = """\
  layout='sibling':  <manual_dir>/<root>/[<split>/]<image_dir>/<stem>.png
                     <manual_dir>/<root>/[<split>/]<mask_dir>/<stem><mask_suffix>.png
  layout='suffix':   <manual_dir>/<root>/[<split>/]<any folders>/<stem>.png and <stem><mask_suffix>.png
  (<split> = train|val|test, optional; any of .png .jpg .jpeg .tif .tiff .gif .bmp)"""


@dataclasses.dataclass(eq=False)
class SegFolderConfig(tfds.core.BuilderConfig):
    """Options of ``seg_folder`` (module docstring).

    Resolution: ``image_size`` > 0 stretches every pair to that square; else ``max_size`` > 0 shrinks pairs
    whose longer side exceeds it, keeping the aspect ratio (dermoscopy archives hold 6000 px photos);
    else the native resolution is kept. Masks are always resized nearest-neighbour.
    """

    root: str = ""
    layout: str = "sibling"
    image_dir: str = "images"
    mask_dir: str = "masks"
    mask_suffix: str = ""
    image_glob: str = "*"
    channels: int = 3
    image_size: int = 0
    max_size: int = 0
    label_mode: str = "auto"
    class_names: tuple[str, ...] = ()
    class_colors: tuple = ()
    extra_masks: str = "error"
    skip_corrupt: bool = False
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    validation_fraction: float = 0.1
    min_validation: int = 50
    seed: int = 0

    def __post_init__(self):
        seg.coerce_fields(self)
        checks = [
            (self.layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {self.layout!r}"),
            (self.layout == "sibling" or self.mask_suffix, "layout='suffix' needs a mask_suffix ('_mask')"),
            (self.extra_masks in EXTRA_MASKS, f"extra_masks must be one of {EXTRA_MASKS}"),
            (self.label_mode in seg.LABEL_MODES, f"label_mode must be one of {seg.LABEL_MODES}"),
            (self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}"),
            (abs(sum(self.split_fractions) - 1.0) < 1e-6, "split_fractions must sum to 1"),
        ]
        seg.check_options("seg_folder", checks)


@dataclasses.dataclass(frozen=True)
class _Pair:
    id: str
    split: str | None
    image: Path
    masks: tuple[Path, ...]


class SegFolder(tfds.core.GeneratorBasedBuilder):
    """Any image + mask archive laid out as in :data:`LAYOUT`."""

    name = "seg_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list[SegFolderConfig]] = [SegFolderConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put the images and masks under manual_dir:\n{LAYOUT}"

    def __init__(self, *, num_workers: int | None = None, **kwargs):
        self._num_workers = num_workers or min(4, os.cpu_count() or 1)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=seg.features(self.builder_config.channels),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # Storage order = id order; training shuffles anyway.
        )

    def _error(self, message: str) -> DatasetLayoutError:
        return DatasetLayoutError(f"seg_folder: {message}\nExpected layout under manual_dir:\n{LAYOUT}")

    def _split_generators(self, dl_manager):
        config = self.builder_config
        root = (Path(dl_manager.manual_dir) / config.root).resolve()
        if not root.is_relative_to(Path(dl_manager.manual_dir).resolve()):
            raise self._error(f"root {config.root!r} leaves manual_dir {dl_manager.manual_dir}")
        if not root.is_dir():
            raise self._error(f"{root} is not a directory")
        report: dict = {"skipped": [], "ignored": []}
        pairs = self._pairs(root, report)
        spill = _Spill()
        records, hist = self._decode(pairs, spill, report)
        if not records:
            raise self._error(f"no image with a readable mask under {root}")
        mapping, rule = seg.label_mapping(hist, config.label_mode)
        num_labels = 1 + int(seg.apply_mapping(np.flatnonzero(hist).astype(np.uint8), mapping).max())
        report["label_rule"] = rule
        plan = splits.plan_splits(
            labels=[r["foreground"] for r in records],
            hashes=[r["hash"] for r in records],
            official=None if records[0]["split"] is None else [r["split"] for r in records],
            fractions=dict(zip(splits.SPLITS, config.split_fractions, strict=True)),
            validation_fraction=config.validation_fraction,
            min_validation=config.min_validation,
            seed=config.seed,
        )
        report.update({k: v for k, v in plan.report.items() if k != "counts"})
        self.info.metadata["preparation"] = report
        names = config.class_names or _default_names(int(num_labels), rule)
        stats = seg.SegmentationStats(self.info.metadata, names)
        assigned = list(zip(records, plan.assignment, strict=True))
        chosen = {s: [r for r, a in assigned if a == s] for s in splits.SPLITS}
        return {
            s: self._generate_examples(s, rows, spill, mapping, stats) for s, rows in chosen.items() if rows
        }

    def _generate_examples(self, split, rows, spill, mapping, stats):
        for r in rows:
            image = seg.decode_png(spill.read(*r["image"]))
            mask = seg.apply_mapping(seg.decode_png(spill.read(*r["mask"]))[..., 0], mapping)
            yield r["id"], stats.add(split, seg.Example(id=r["id"], image=image, mask=mask))

    # Pairing -------------------------------------------------------------------------------------------

    def _pairs(self, root: Path, report: dict) -> list[_Pair]:
        config = self.builder_config
        units = {
            SPLIT_FOLDERS[normalise(p.name)]: p
            for p in sorted(root.iterdir())
            if p.is_dir() and normalise(p.name) in SPLIT_FOLDERS
        }
        if units and not {"train", "test"} <= set(units):
            raise self._error(f"{root} has split folders {sorted(units)} but needs train and test")
        pairs: list[_Pair] = []
        problems: list[str] = []
        for split, unit in (units or {None: root}).items():
            find = self._sibling_pairs if config.layout == "sibling" else self._suffix_pairs
            found, unit_problems = find(unit, root, split, report)
            pairs += found
            problems += unit_problems
        if problems and not config.skip_corrupt:
            listing = "\n".join(f"  {p}" for p in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise self._error(
                f"{len(problems)} unpaired file(s) under {root}:\n{listing}{more}\n"
                "Fix the names (or mask_suffix / image_glob), or pass skip_corrupt=True to skip and list them"
            )
        report["skipped"] += [{"file": p, "reason": "unpaired"} for p in problems]
        return pairs

    def _candidates(self, folder: Path, root: Path, report: dict) -> list[Path]:
        if not folder.is_dir():
            raise self._error(f"missing folder {folder}")
        out = []
        for path in sorted(folder.rglob("*")):
            if any(is_junk(part) for part in path.relative_to(folder).parts) or not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                out.append(path)
            else:
                report["ignored"].append(os.path.relpath(path, root))
        return out

    def _sibling_pairs(self, unit: Path, root: Path, split, report) -> tuple[list[_Pair], list[str]]:
        config = self.builder_config
        image_dir, mask_dir = unit / config.image_dir, unit / config.mask_dir
        masks = {}
        for path in self._candidates(mask_dir, root, report):
            key = (path.parent.relative_to(mask_dir), path.stem)
            masks.setdefault(key, []).append(path)
        pairs, problems, used = [], [], set()
        for path in self._candidates(image_dir, root, report):
            if not fnmatch.fnmatch(path.name, config.image_glob):
                report["ignored"].append(os.path.relpath(path, root))
                continue
            key = (path.parent.relative_to(image_dir), path.stem + config.mask_suffix)
            found = masks.get(key, [])
            rel = Path(os.path.relpath(path, root)).as_posix()
            if len(found) != 1:
                expected = mask_dir / key[0] / f"{key[1]}.*"
                problems.append(f"{rel}: {'no mask' if not found else 'several masks'} ({expected})")
                continue
            used.add(key)
            pairs.append(_Pair(rel, split, path, tuple(found)))
        return pairs, problems + _orphans(masks, used, root)

    def _suffix_pairs(self, unit: Path, root: Path, split, report) -> tuple[list[_Pair], list[str]]:
        config = self.builder_config
        suffix = re.escape(config.mask_suffix)
        mask_name = re.compile(rf"^(?P<stem>.*?){suffix}(?:_(?P<n>\d+))?$")
        files = self._candidates(unit, root, report)
        masks: dict[tuple[Path, str], list[Path]] = {}
        image_files = []
        for path in files:
            match = mask_name.match(path.stem)
            if match:
                masks.setdefault((path.parent, match["stem"]), []).append(path)
            elif fnmatch.fnmatch(path.name, config.image_glob):
                image_files.append(path)
            else:
                report["ignored"].append(os.path.relpath(path, root))
        pairs, problems, used = [], [], set()
        for path in image_files:
            key = (path.parent, path.stem)
            found = sorted(masks.get(key, []), key=lambda p: (len(p.stem), p.name))
            rel = Path(os.path.relpath(path, root)).as_posix()
            if not found:
                problems.append(f"{rel}: no mask ({path.parent / (path.stem + config.mask_suffix)}.*)")
                continue
            used.add(key)
            if len(found) > 1 and config.extra_masks == "error":
                names = [p.name for p in found]
                problems.append(f"{rel}: several masks {names} (extra_masks='union' merges them)")
                continue
            keep = found if config.extra_masks == "union" else found[:1]
            pairs.append(_Pair(rel, split, path, tuple(keep)))
        return pairs, problems + _orphans(masks, used, root)

    # Decoding ------------------------------------------------------------------------------------------

    def _decode(self, pairs: list[_Pair], spill: _Spill, report: dict) -> tuple[list[dict], np.ndarray]:
        """Decodes and checks every pair (threads); spills PNGs; returns records and the mask histogram."""
        config = self.builder_config
        records, failures, hist = [], [], np.zeros(256, np.int64)
        with concurrent.futures.ThreadPoolExecutor(self._num_workers) as pool:
            for pair, (result, error) in zip(pairs, pool.map(self._load, pairs), strict=True):
                if error is not None:
                    failures.append({"file": pair.id, "reason": error})
                    continue
                image, mask = result
                hist += seg.histogram(mask)
                records.append(
                    {
                        "id": pair.id,
                        "split": pair.split,
                        "hash": images.pixel_hash(image),
                        "foreground": int(mask.any()),
                        "image": spill.append(images.encode_png(image)),
                        "mask": spill.append(images.encode_png(mask[..., None])),
                    }
                )
        if failures and not config.skip_corrupt:
            listing = "\n".join(f"  {f['file']}: {f['reason']}" for f in failures[:20])
            raise images.ImageDecodeError(
                f"seg_folder: {len(failures)} unusable image/mask pair(s):\n{listing}\n"
                "Pass skip_corrupt=True to skip them (they are then listed in the preparation report)."
            )
        report["skipped"] += failures
        return records, hist

    def _load(self, pair: _Pair) -> tuple[tuple[np.ndarray, np.ndarray] | None, str | None]:
        config = self.builder_config
        try:
            image = images.decode_image(pair.image, channels=config.channels)
            planes = []
            for path in pair.masks:
                plane = seg.decode_mask_file(path)
                if plane.ndim == 3:
                    if not config.class_colors:
                        raise images.ImageDecodeError(f"{path}: colour mask; set class_colors (RGB each)")
                    plane = seg.colours_to_labels(plane, config.class_colors, str(path))
                if plane.shape != image.shape[:2]:
                    raise images.ImageDecodeError(
                        f"mask {path.name} is {plane.shape[1]}x{plane.shape[0]} (WxH) but the image is "
                        f"{image.shape[1]}x{image.shape[0]}"
                    )
                planes.append(plane)
        except images.ImageDecodeError as e:
            return None, str(e)
        example = seg.Example(pair.id, image, np.maximum.reduce(planes))
        h, w = example.mask.shape
        if config.image_size:
            example = seg.resize_planes(example, (config.image_size, config.image_size))
        elif config.max_size and max(h, w) > config.max_size:
            scale = config.max_size / max(h, w)
            example = seg.resize_planes(example, (max(1, round(h * scale)), max(1, round(w * scale))))
        return (example.image, example.mask), None


def _orphans(masks: dict, used: set, root: Path) -> list[str]:
    """Problems for mask files whose image is missing (``masks``: pairing key -> paths)."""
    return [
        f"{os.path.relpath(p, root)}: mask without an image"
        for key, paths in masks.items()
        if key not in used
        for p in paths
    ]


def _default_names(num_labels: int, rule: str) -> tuple[str, ...]:
    if rule.startswith("binary") or num_labels <= 2:
        return ("background", "foreground")
    return ("background", *(f"class_{k}" for k in range(1, num_labels)))


Builder = SegFolder
Config = SegFolderConfig
