"""Dataset registry: one TFDS builder per module, loaded by name, configured by keyword arguments.

Contract for a dataset module ``medjax/data/builders/<name>.py``:

* It defines a ``tfds.core.GeneratorBasedBuilder`` subclass whose TFDS ``name`` equals the module name
  (name the class in CamelCase, e.g. ``SyntheticCt`` for ``synthetic_ct``, or set ``name`` explicitly:
  a class literally called ``Builder`` would be registered by TFDS under the package name) and exports it
  as the module-level ``Builder``.
* It may export ``Config``, a dataclass subclass of ``tfds.core.BuilderConfig`` whose extra fields, all
  with defaults, are the accepted ``builder_kwargs``; the builder reads them from ``self.builder_config``.
  Without ``Config`` the dataset accepts no kwargs.
* Images are handed to ``tfds.features.Image(encoding_format='png')`` as already-encoded bytes (numpy
  arrays would make TFDS import TensorFlow); splits are 'train', 'validation', 'test'.
* Classification datasets have ``image``, ``label`` (ClassLabel) and ``id``; segmentation datasets use the
  schema of :mod:`medjax.data.builders._segmentation` (``mask``, ``valid``, ``case_id``, ...) and record
  their class names in ``metadata['segmentation']``, which is how the pipeline tells the two apart.
* Manual-download datasets set ``MANUAL_DOWNLOAD_INSTRUCTIONS`` and read ``dl_manager.manual_dir``.
* Modules whose name starts with ``_`` are helpers, not datasets.

Why a config per kwargs set: TFDS stores a prepared dataset under ``<data_dir>/<name>/<config>/<version>``.
The config name is derived deterministically from *all* resolved field values (defaults included), so
different kwargs never share a directory, identical kwargs reuse the prepared files, and changing a
default in code also moves to a fresh directory instead of silently reusing stale data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import pkgutil
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from medjax import locking
from medjax.errors import DatasetNotFoundError

INCOMPLETE_PREFIX = tfds.core.constants.INCOMPLETE_PREFIX  # Of TFDS's unfinished preparations.

# Environment variables naming the default data directory, in order of precedence.
DATA_DIR_ENV_VARS = ("MEDJAX_DATA_DIR", "TFDS_DATA_DIR")
# Attribute under which get_builder records the manual directory for prepare().
_MANUAL_DIR_ATTR = "_medjax_manual_dir"
# Fields of tfds.core.BuilderConfig itself; everything else on a Config is a builder kwarg.
_BASE_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(tfds.core.BuilderConfig))


def available_datasets() -> list[str]:
    """Names accepted by :func:`get_builder` (the non-private modules of this package)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def default_data_dir() -> str:
    """``$MEDJAX_DATA_DIR``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.

    MEDJAX_DATA_DIR wins so that medjax data can live apart from other TFDS datasets on the same machine.
    """
    for var in DATA_DIR_ENV_VARS:
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    return os.path.expanduser("~/tensorflow_datasets")


def accepted_kwargs(name: str) -> dict[str, Any]:
    """The ``builder_kwargs`` dataset ``name`` accepts, with their defaults."""
    config_cls = getattr(_import(name), "Config", None)
    if config_cls is None:
        return {}
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(config_cls)
        if f.name not in _BASE_CONFIG_FIELDS
    }


def config_name(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """Deterministic TFDS config name: readable non-default values plus a digest of all values.

    Values are compared in their JSON form, so a list and a tuple with the same items name the same
    config. Example: ``image_size32-num_train40-3f9a0c1d``; all defaults give ``default-<digest>``.
    """
    canonical = {k: json.dumps(values[k], sort_keys=True, default=list) for k in sorted(values)}
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:8]
    readable = ""
    for k, text in canonical.items():
        if text == json.dumps(defaults[k], sort_keys=True, default=list):
            continue
        token = k + re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")
        if len(readable) + len(token) + 1 > 48:  # Long names stay readable; the digest stays exact.
            break
        readable = f"{readable}-{token}" if readable else token
    return f"{readable or 'default'}-{digest}"


def check_kwargs(name: str, builder_kwargs: Mapping[str, Any]) -> tfds.core.BuilderConfig | None:
    """The dataset's ``Config`` for ``builder_kwargs`` (None for a dataset without kwargs), built without
    reading or writing any file, so a config is checked before any work starts.

    Raises:
      ValueError: an unknown kwarg (the message lists the accepted ones) or a value the dataset's
        ``Config`` rejects; TypeError: a value of the wrong type.
    """
    module = _import(name)
    kwargs = dict(builder_kwargs)
    defaults = accepted_kwargs(name)
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(
            f"Unknown builder_kwargs {unknown} for dataset {name!r}. "
            f"Accepted: {', '.join(sorted(defaults)) or '(none)'}."
        )
    if not hasattr(module, "Config"):
        return None
    values = {**defaults, **kwargs}
    return module.Config(name=config_name(values, defaults), description=f"{name} with {values}", **values)


def get_builder(
    name: str,
    *,
    data_dir: str | None,
    manual_dir: str | None = None,
    builder_kwargs: Mapping[str, Any] | None = None,
) -> tfds.core.DatasetBuilder:
    """Instantiates dataset ``name`` configured by ``builder_kwargs`` (nothing is read or written yet).

    Args:
      name: module name in this package, e.g. ``'synthetic_ct'``.
      data_dir: root of prepared datasets; ``None`` means :func:`default_data_dir`.
      manual_dir: directory holding the raw files of a manual-download dataset; ``None`` means
        ``<data_dir>/downloads/manual/<name>``. Recorded on the builder for :func:`prepare`.
      builder_kwargs: values for the fields of the module's ``Config``.

    Raises:
      ValueError: unknown ``name`` (the message lists the available datasets) or unknown kwarg (the message
        names it and lists the accepted ones).
    """
    names = available_datasets()
    if name not in names:
        raise ValueError(f"Unknown dataset {name!r}. Available datasets: {', '.join(names)}.")
    module = _import(name)
    builder_cls = module.Builder
    if builder_cls.name != name:
        raise TypeError(f"medjax.data.builders.{name}.Builder is registered in TFDS as {builder_cls.name!r}.")
    config = check_kwargs(name, builder_kwargs or {})
    data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
    builder = builder_cls(data_dir=data_dir, config=config)
    setattr(builder, _MANUAL_DIR_ATTR, os.path.expanduser(manual_dir or _default_manual_dir(data_dir, name)))
    return builder


def prepare(builder: tfds.core.DatasetBuilder, *, manual_dir: str | None = None) -> None:
    """Writes the dataset as ArrayRecord files unless it is already prepared.

    TFDS writes into a temporary ``incomplete.*`` directory and renames it into place only after every
    split and ``dataset_info.json`` are written, so an interrupted preparation is never mistaken for a
    finished one; the next call removes what it left and starts again. One process prepares a dataset
    at a time (:mod:`medjax.locking`): another one waits, saying for which process, then uses the result.
    TFDS draws per-split progress bars meanwhile; a summary line follows (what was skipped, what
    conflicts).

    Args:
      builder: from :func:`get_builder`.
      manual_dir: overrides the manual directory recorded by :func:`get_builder` (default
        ``<data_dir>/downloads/manual/<name>``).

    Raises:
      DatasetNotFoundError: a manual-download dataset whose manual directory is missing or empty; the
        message quotes the dataset's download instructions and the exact directory to fill.
    """
    if builder.is_prepared():
        return
    download_config = None
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual = Path(
            manual_dir
            or getattr(builder, _MANUAL_DIR_ATTR, None)
            or _default_manual_dir(os.fspath(builder.data_dir_root), builder.name)
        ).expanduser()
        if not manual.is_dir() or not any(manual.iterdir()):
            raise DatasetNotFoundError(
                f"Dataset {builder.name!r} needs files downloaded by hand into {manual} "
                f"(missing or empty).\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}\n"
                f"Then set config.data.manual_dir to that folder (now: {manual})."
            )
        download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual))
    target = Path(builder.data_dir)
    name = builder.info.full_name

    def waiting(holder: str) -> None:
        print(f"Waiting for {holder}, which is preparing {name}.", flush=True)

    with locking.exclusive(
        target.parent / f".{target.name}.lock", what=f"preparation of {name}", wait=waiting
    ):
        if builder.is_prepared():  # The process waited for prepared it.
            builder.info.read_from_directory(builder.data_dir)
            return
        for leftover in target.parent.glob(f"{INCOMPLETE_PREFIX}*_{target.name}"):
            shutil.rmtree(leftover)  # An interrupted preparation's; under the lock nobody writes it.
        logging.info("Preparing %s into %s (first use only).", name, builder.data_dir)
        builder.download_and_prepare(file_format="array_record", download_config=download_config)
    print(preparation_summary(builder), flush=True)


def preparation_summary(builder: tfds.core.DatasetBuilder) -> str:
    """One paragraph on a prepared dataset: examples per split, and what was skipped or conflicts (the
    full lists are in ``builder.info.metadata['preparation']``, i.e. the dataset's ``metadata.json``)."""
    counts = ", ".join(f"{split} {info.num_examples}" for split, info in builder.info.splits.items())
    lines = [f"Prepared {builder.info.full_name} in {builder.data_dir}: {counts}."]
    report = dict((builder.info.metadata or {}).get("preparation") or {})
    skipped = report.get("skipped_corrupt") or []
    if skipped:
        first = skipped[0]["id"]
        lines.append(f"Skipped {len(skipped)} unreadable file(s) (first: {first}).")
    links = report.get("skipped_links") or []
    if links:
        lines.append(
            f"Skipped {len(links)} symbolic link(s) (first: {links[0]['path']}: {links[0]['reason']})."
        )
    if report.get("label_conflict_groups"):
        items, groups = report.get("label_conflict_items", "?"), report["label_conflict_groups"]
        lines.append(f"{items} images in {groups} groups of identical pixels carry conflicting labels.")
    if report.get("duplicates_dropped"):
        lines.append(f"Dropped {report['duplicates_dropped']} duplicate images.")
    if len(lines) > 1:
        lines.append(f"Full lists: {Path(builder.data_dir) / 'metadata.json'}.")
    return " ".join(lines)


def _default_manual_dir(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, "downloads", "manual", name)


def _import(name: str):
    return importlib.import_module(f"{__name__}.{name}")
