"""Shared bases of the medjax TFDS builders: configs from ``builder_kwargs`` and folder scanning.

Two bases live here because every real dataset needs the same plumbing:

* :class:`MedicalImageBuilder` turns ``builder_kwargs`` into a config (``make_config``), declares the
  common features (``image``: PNG bytes, ``image_size`` x ``image_size`` x ``channels``; ``label``; ``id``),
  runs the duplicate-aware split planner (:mod:`medjax.data.splits`) and writes a preparation report into the
  dataset's ``metadata.json``. Subclasses only implement ``_collect``: find the source images.
* :class:`FolderBuilder` implements ``_collect`` for ``<root>/<split>/<class>/*`` and ``<root>/<class>/*``
  archives, tolerating wrapper folders (``chest_xray/chest_xray``), ``__MACOSX`` and OS litter.
  Symbolic links are followed while they stay inside manual_dir and lead to something not yet scanned;
  a link that leaves manual_dir, is broken, or leads back to a folder already scanned (``loop -> .``
  would otherwise become a class holding every image) is skipped and listed in the report
  (``skipped_links``). File names need not be UTF-8 (ids use :func:`medjax.data.images.printable`).

Images are decoded once, in a thread pool (Pillow and zlib release the GIL), and their PNG bytes are
spilled to a temporary file so that 17k-image datasets at 224 px do not sit in RAM until TFDS writes them.
TFDS writes into an ``incomplete.*`` directory that is renamed only on success, so an interrupted
preparation never leaves a dataset that loads as complete.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import dataclasses
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from medjax.data import images, near_duplicates, splits
from medjax.errors import DataError

JUNK_NAMES = frozenset({"thumbs.db", ".ds_store", "desktop.ini", "__macosx"})
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
SPLIT_FOLDERS = {alias: split for split, aliases in SPLIT_ALIASES.items() for alias in aliases}
_TFDS_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(tfds.core.BuilderConfig))
_MAX_SEARCH_DEPTH = 4


class DatasetLayoutError(DataError):
    """The manual directory does not hold the expected layout; the message names the path and layout."""


def is_junk(name: str) -> bool:
    """Hidden files, AppleDouble ``._*`` files, ``Thumbs.db``, ``.DS_Store``, ``__MACOSX``."""
    return name.startswith(".") or name.lower() in JUNK_NAMES


def normalise(name: str) -> str:
    """Folder-name key ignoring case, spaces, '-' and '_' ('Monkey Pox' == 'monkeypox')."""
    return re.sub(r"[\s_\-]+", "", name.lower())


@dataclasses.dataclass(eq=False)
class ImageConfig(tfds.core.BuilderConfig):
    """Options shared by all builders (``Builder.make_config(**builder_kwargs)`` or the registry).

    ``image_size``/``channels``: stored shape (channels 1 or 3); ``resize``: 'stretch' | 'pad' | 'crop'
    (see :func:`medjax.data.images.resize_image`); ``drop_duplicates``: keep one copy per pixel-identical
    group instead of only keeping groups inside one split. ``cv_folds`` >= 2 re-splits everything but
    test into that many grouped, stratified folds and makes fold ``cv_fold`` the validation split
    (``launch/cross_validate.py`` prepares one dataset per fold). ``train_examples`` > 0 keeps a grouped,
    stratified subset of about that many training images (nested: smaller subsets are parts of larger
    ones) and the other splits as they are, for results at a few hundred labels.
    """

    image_size: int = 224
    channels: int = 3
    resize: str = "stretch"
    drop_duplicates: bool = False
    cv_folds: int = 0
    cv_fold: int = 0
    train_examples: int = 0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if field.name not in _TFDS_CONFIG_FIELDS:
                setattr(self, field.name, _coerce(field.name, getattr(self, field.name), field.default))
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.resize not in images.RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {images.RESIZE_POLICIES}, got {self.resize!r}")
        if self.cv_folds and not (self.cv_folds >= 2 and 0 <= self.cv_fold < self.cv_folds):
            raise ValueError(
                f"cv_folds must be 0 or >= 2 with 0 <= cv_fold < cv_folds, got {self.cv_folds}, "
                f"{self.cv_fold}"
            )
        if self.train_examples < 0:
            raise ValueError(f"train_examples must be >= 0 (0: all), got {self.train_examples}")


@dataclasses.dataclass(eq=False)
class FolderConfig(ImageConfig):
    """Options of folder datasets; the split fields are explained in :func:`medjax.data.splits.plan_splits`.

    ``split_fractions`` (train, validation, test) apply when the archive has no official split; a zero
    fraction leaves that split out. ``validation_fraction`` is carved from an official train split whose
    validation split is absent or smaller than ``min_validation``. ``skip_corrupt`` skips unreadable files
    (listed in the report) instead of failing; ``dicom_window`` = (center, width) overrides DICOM windows.
    ``group_pattern`` is a regular expression searched in each image's path relative to the dataset root
    (e.g. ``train/PNEUMONIA/person12_virus_5.jpeg``); its first matched capture group (or the whole match)
    names the image's patient, and one patient's images are never separated by a split drawn here.
    Images it does not match are their own group; the report counts them.
    """

    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    validation_fraction: float = 0.1
    min_validation: int = 50
    seed: int = 0
    skip_corrupt: bool = False
    dicom_window: tuple[float, float] | None = None
    group_pattern: str = ""

    def __post_init__(self):
        super().__post_init__()
        try:
            re.compile(self.group_pattern)
        except re.error as e:
            raise ValueError(f"group_pattern {self.group_pattern!r} is not a regular expression: {e}") from e
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be 3 numbers summing to 1, got {self.split_fractions}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, '/'-separated and printable: a record id or report entry."""
    return images.printable(Path(os.path.relpath(path, root)).as_posix())


def _coerce(key: str, value, default):
    """Checks a field against its default's type; lists (ml_collections, JSON) become tuples, ints floats."""
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float)
        value = float(value) if ok else value
    elif isinstance(default, tuple) or default is None:
        ok = value is None or isinstance(value, tuple)
        if ok and value and all(isinstance(x, int | float) for x in value):
            value = tuple(float(x) for x in value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise TypeError(f"builder kwarg {key}={value!r} has the wrong type; default is {default!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Record:
    """One source image: its id (relative path), label, official split, PNG location in the spill, pixel
    hash, near-duplicate fingerprint and patient key (None: its own group)."""

    id: str
    label: int
    official: str | None
    offset: int
    length: int
    hash: str
    fingerprint: np.ndarray
    key: str | None = None


def group_key(pattern: str, item_id: str) -> str | None:
    """The patient ``pattern`` finds in ``item_id``: its first matched capture group, else the whole
    match; None when it does not match (or there is no pattern)."""
    match = re.search(pattern, item_id) if pattern else None
    if match is None:
        return None
    return next((g for g in match.groups() if g is not None), match.group(0))


class _Spill:
    """Append-only temporary file of encoded images (keeps large datasets out of RAM until written)."""

    def __init__(self):
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 (must outlive this call)
        self._size = 0

    def append(self, data: bytes) -> tuple[int, int]:
        self._file.seek(self._size)
        self._file.write(data)
        self._size += len(data)
        return self._size - len(data), len(data)

    def read(self, offset: int, length: int) -> bytes:
        self._file.seek(offset)
        return self._file.read(length)


class MedicalImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of every medjax dataset builder (not registered itself)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list[ImageConfig]] = [ImageConfig(name="default")]
    DESCRIPTION: ClassVar[str] = ""
    HOMEPAGE: ClassVar[str] = ""
    # Label names in label order, or None when they are only known once the source is read.
    CLASS_NAMES: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, *, num_workers: int | None = None, **kwargs):
        """``num_workers`` decoding threads (default: CPU count, at most 4); other args go to TFDS."""
        self._num_workers = num_workers or min(4, os.cpu_count() or 1)
        super().__init__(**kwargs)

    @classmethod
    def accepted_kwargs(cls) -> dict:
        """``builder_kwargs`` this builder accepts, with their defaults."""
        fields = dataclasses.fields(cls.BUILDER_CONFIGS[0])
        return {f.name: f.default for f in fields if f.name not in _TFDS_CONFIG_FIELDS}

    @classmethod
    def make_config(cls, **builder_kwargs) -> ImageConfig:
        """Builds the config for ``builder_kwargs``, as the registry does with ``Config``.

        The name comes from the registry's ``config_name`` (readable non-default values plus a digest of
        all values), so a config made here and one made by the registry share one prepared directory.
        Raises ValueError on unknown kwargs (listing the accepted ones), TypeError on wrongly typed ones.
        """
        from medjax.data.builders import config_name  # The package imports this module lazily.

        defaults = cls.accepted_kwargs()
        unknown = sorted(set(builder_kwargs) - set(defaults))
        if unknown:
            raise ValueError(f"{cls.name}: unknown builder_kwargs {unknown}; accepted: {sorted(defaults)}")
        values = {**defaults, **builder_kwargs}
        return type(cls.BUILDER_CONFIGS[0])(
            name=config_name(values, defaults), description=f"{cls.name} with {values}", **values
        )

    def class_names(self) -> tuple[str, ...] | None:
        """Label names for this config (None: decided while preparing, e.g. from folder names)."""
        return self.CLASS_NAMES

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        names = self.class_names()
        size = config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, config.channels), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=list(names) if names else None),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
        )

    def image_spec(self) -> images.ImageSpec:
        config = self.builder_config
        return images.ImageSpec(
            size=config.image_size,
            channels=config.channels,
            resize=config.resize,
            window=getattr(config, "dicom_window", None),
        )

    @abc.abstractmethod
    def _collect(
        self, manual_dir: Path, store: Callable[[bytes], tuple[int, int]]
    ) -> tuple[list, list, dict]:
        """Reads the source; returns (records, class names, report). ``store`` spills PNG bytes."""

    def _split_options(self) -> dict:
        """Keyword arguments of :func:`splits.plan_splits` taken from the config."""
        config = self.builder_config
        return {
            "drop_duplicates": config.drop_duplicates,
            "cv_folds": config.cv_folds,
            "cv_fold": config.cv_fold,
            "train_examples": config.train_examples,
        }

    def _split_generators(self, dl_manager):
        try:
            manual_dir = Path(dl_manager.manual_dir)
        except AssertionError as e:  # TFDS's message names the directory and our instructions.
            raise DatasetLayoutError(f"{self.name}: {e}") from e
        spill = _Spill()
        records, names, report = self._collect(manual_dir, spill.append)
        if not records:
            raise DatasetLayoutError(f"{self.name}: no images found in {manual_dir}")
        self.info.features["label"].names = list(names)
        near_pairs = near_duplicates.find_pairs(np.stack([r.fingerprint for r in records]))
        plan = splits.plan_splits(
            labels=[r.label for r in records],
            hashes=[r.hash for r in records],
            official=None if records[0].official is None else [r.official for r in records],
            keys=[r.key for r in records] if getattr(self.builder_config, "group_pattern", "") else None,
            near_pairs=near_pairs,
            ids=[r.id for r in records],
            **self._split_options(),
        )
        report.update(plan.report)
        report["counts"] = {
            split: {names[k]: n for k, n in per_class.items()}
            for split, per_class in plan.report["counts"].items()
        }
        by_hash = collections.defaultdict(list)
        for r in records:
            by_hash[r.hash].append(r.id)
        report["duplicate_examples"] = [ids for ids in by_hash.values() if len(ids) > 1][:20]
        self.info.metadata["preparation"] = report
        logging.info("%s/%s preparation report: %s", self.name, self.builder_config.name, report)
        chosen = collections.defaultdict(list)
        for record, split in zip(records, plan.assignment, strict=True):
            if split is not None:
                chosen[split].append(record)
        return {
            split: self._generate_examples(chosen[split], spill) for split in splits.SPLITS if chosen[split]
        }

    def _generate_examples(self, records: Sequence[Record], spill: _Spill) -> Iterator[tuple[str, dict]]:
        for r in records:
            yield r.id, {"image": spill.read(r.offset, r.length), "label": r.label, "id": r.id}


class FolderBuilder(MedicalImageBuilder, skip_registration=True):
    """Base for ``<root>/<split>/<class>/*`` or ``<root>/<class>/*`` archives.

    Subclasses set ``CLASS_FOLDERS`` (label name -> accepted folder names, compared with
    :func:`normalise`) and ``LAYOUT`` (the expected layout, quoted in every error and in
    ``MANUAL_DOWNLOAD_INSTRUCTIONS``). The root is the shallowest folder (up to 4 levels below
    ``search_root``) holding split or class folders; other folders beside them are ignored and reported.
    """

    BUILDER_CONFIGS: ClassVar[list[ImageConfig]] = [FolderConfig(name="default")]
    CLASS_FOLDERS: ClassVar[dict[str, tuple[str, ...]] | None] = None
    LAYOUT: ClassVar[str] = "<root>/<class>/*.png or <root>/{train,validation,test}/<class>/*.png"

    def class_names(self) -> tuple[str, ...] | None:
        folders = self.class_folders()
        return tuple(folders) if folders else None

    def class_folders(self) -> dict[str, tuple[str, ...]] | None:
        """Label name -> accepted folder names for this config; None discovers classes from folders."""
        return self.CLASS_FOLDERS

    def search_root(self, manual_dir: Path) -> Path:
        """Where the root search starts (subclasses narrow it, e.g. to 'Original Images')."""
        return manual_dir

    def ignore_dir(self, name: str) -> bool:
        """Folders skipped while searching for the root (besides junk)."""
        return is_junk(name)

    def _split_options(self) -> dict:
        config = self.builder_config
        return {
            **super()._split_options(),
            "fractions": dict(zip(splits.SPLITS, config.split_fractions, strict=True)),
            "validation_fraction": config.validation_fraction,
            "min_validation": config.min_validation,
            "seed": config.seed,
        }

    def _layout_error(self, message: str) -> DatasetLayoutError:
        return DatasetLayoutError(f"{self.name}: {message}\nExpected layout under manual_dir:\n{self.LAYOUT}")

    def _subdirs(self, path: Path) -> list[Path]:
        return sorted(
            p for p in path.iterdir() if p.is_dir() and not self.ignore_dir(p.name) and self._follow(p)
        )

    def _follow(self, path: Path) -> bool:
        """False (and the link listed in ``self._skipped_links``) for a symbolic link that leaves
        manual_dir, is broken or loops; True for everything else."""
        if not path.is_symlink():
            return True
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError) as e:  # RuntimeError: a loop of links (Python 3.11).
            reason = f"broken or looping link ({e.__class__.__name__})"
        else:
            scan_root = getattr(self, "_scan_root", None)
            if scan_root is not None and not target.is_relative_to(scan_root):
                reason = f"link leaves manual_dir (to {images.printable(target)})"
            elif target.is_dir() and path.parent.resolve().is_relative_to(target):
                reason = "link to a folder that contains it (a loop)"
            else:
                return True
        self._follow_skip(path, reason)
        return False

    def _match_classes(self, subdirs: list[Path]) -> dict[str, Path]:
        """Label name -> folder among ``subdirs`` (discovered classes: every folder is a class)."""
        folders = self.class_folders()
        if folders is None:
            return {images.printable(p.name): p for p in subdirs}
        found: dict[str, Path] = {}
        for name, aliases in folders.items():
            keys = {normalise(a) for a in (name, *aliases)}
            hits = [p for p in subdirs if normalise(p.name) in keys]
            if len(hits) > 1:
                raise self._layout_error(f"ambiguous class folders for {name!r}: {[str(p) for p in hits]}")
            if hits:
                found[name] = hits[0]
        return found

    def _find_root(self, start: Path) -> tuple[Path, bool]:
        """Returns (root, has_split_folders): breadth-first, shallowest folder with split/class folders."""
        if not start.is_dir():
            raise self._layout_error(f"{start} is not a directory")
        level = [start]
        for _ in range(_MAX_SEARCH_DEPTH + 1):
            for folder in level:
                subdirs = self._subdirs(folder)
                if any(normalise(p.name) in SPLIT_FOLDERS for p in subdirs):
                    return folder, True
                discovering = self.class_folders() is None
                # Discovered classes: descend through single-folder wrappers (one class is no dataset).
                if (discovering and len(subdirs) > 1) or (not discovering and self._match_classes(subdirs)):
                    return folder, False
            level = [p for folder in level for p in self._subdirs(folder)]
        raise self._layout_error(
            f"no split or class folders found within {_MAX_SEARCH_DEPTH} levels of {start}"
        )

    def _class_dirs(self, parent: Path, names: Sequence[str] | None) -> dict[str, Path]:
        found = self._match_classes(self._subdirs(parent))
        expected = names if names is not None else sorted(found)
        missing = [n for n in expected if n not in found]
        if missing or not found:
            raise self._layout_error(f"missing class folder(s) {missing or 'all'} in {parent}")
        return {n: found[n] for n in expected}

    def _locate(self, manual_dir: Path) -> tuple[Path, dict, dict[str | None, dict[str, Path]]]:
        """``(root, split folders, class folders per split)``: split None when the archive has no
        official split; the class folders of each split in label order."""
        root, has_splits = self._find_root(self.search_root(manual_dir))
        tops = self._subdirs(root)
        if has_splits:
            split_dirs = {
                SPLIT_FOLDERS[normalise(p.name)]: p for p in tops if normalise(p.name) in SPLIT_FOLDERS
            }
            if not {"train", "test"} <= set(split_dirs):
                raise self._layout_error(
                    f"{root} has split folders {sorted(split_dirs)} but needs train and test"
                )
        else:
            split_dirs = {None: root}
        names = self.class_names()
        if names is None:
            names = sorted({n for d in split_dirs.values() for n in self._match_classes(self._subdirs(d))})
        return root, split_dirs, {split: self._class_dirs(d, names) for split, d in split_dirs.items()}

    def _collect(self, manual_dir: Path, store) -> tuple[list, list, dict]:
        self._scan_root, self._skipped_links = manual_dir.resolve(), []
        root, split_dirs, class_dirs = self._locate(manual_dir)
        names = list(next(iter(class_dirs.values())))
        config = self.builder_config
        report: dict = {
            "root": images.printable(os.path.relpath(root, manual_dir)),
            "group_pattern": config.group_pattern,
            "ignored": [],
            "skipped_corrupt": [],
        }
        class_folders = {p for dirs in class_dirs.values() for p in dirs.values()}
        used = class_folders | set(split_dirs.values())
        for parent in {root, *split_dirs.values()} - class_folders:  # A class folder's files are all read.
            report["ignored"] += [_rel(p, root) for p in sorted(parent.iterdir()) if p not in used]
        jobs = []
        for split, dirs in class_dirs.items():
            for label, (name, folder) in enumerate(dirs.items()):
                files, junk = self._list_files(folder)
                report["ignored"] += [_rel(p, root) for p in junk]
                if not files:
                    raise self._layout_error(f"empty class folder {folder} (class {name!r})")
                jobs += [(p, label, split) for p in files]
        spec = self.image_spec()
        records, failures = [], []
        with concurrent.futures.ThreadPoolExecutor(self._num_workers) as pool:
            # Consumed in order as they finish, so PNG bytes go to the spill file instead of piling up.
            results = pool.map(lambda job: images.try_prepare_file(job[0], spec), jobs)
            for (path, label, split), (result, error) in zip(jobs, results, strict=True):
                rel = _rel(path, root)
                if error is not None:
                    failures.append((rel, error))
                else:
                    key = group_key(config.group_pattern, rel)
                    records.append(Record(rel, label, split, *store(result.png), *result[1:], key=key))
        if failures and not config.skip_corrupt:
            listing = "\n".join(f"  {e}" for _, e in failures[:10])
            raise images.ImageDecodeError(
                f"{self.name}: {len(failures)} unreadable file(s) under {root}:\n{listing}\n"
                f"Expected layout under manual_dir:\n{self.LAYOUT}\n"
                "Pass skip_corrupt=True to skip them (they are then listed in the preparation report)."
            )
        report["skipped_corrupt"] = [{"id": rel, "reason": e} for rel, e in failures]
        report["skipped_links"] = list(self._skipped_links)
        for split, dirs in class_dirs.items():
            for label, name in enumerate(dirs):
                if not any(r.official == split and r.label == label for r in records):
                    raise self._layout_error(f"class folder {dirs[name]} has no readable image")
        return records, list(names), report

    def _list_files(self, folder: Path) -> tuple[list[Path], list[Path]]:
        """All files below ``folder`` (sorted), split into candidates and junk; links as :meth:`_follow`
        says, each real folder scanned once."""
        files, junk, seen = [], [], {folder.resolve()}
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            parent = Path(dirpath)
            kept = []
            for name in sorted(dirnames):
                path = parent / name
                if is_junk(name):
                    junk.append(path)
                elif not self._follow(path):
                    continue
                elif path.resolve() in seen:
                    self._follow_skip(path, "link to a folder already scanned")
                else:
                    seen.add(path.resolve())
                    kept.append(name)
            dirnames[:] = kept
            for name in filenames:
                path = parent / name
                if is_junk(name):
                    junk.append(path)
                elif self._follow(path):
                    files.append(path)
        return sorted(files), sorted(junk)

    def _follow_skip(self, path: Path, reason: str) -> None:
        scan_root = getattr(self, "_scan_root", None)
        shown = _rel(path, scan_root) if scan_root and path.absolute().is_relative_to(scan_root) else path
        entry = {"path": images.printable(shown), "reason": reason}
        skipped = self.__dict__.setdefault("_skipped_links", [])
        if entry not in skipped:
            skipped.append(entry)
