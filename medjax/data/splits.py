"""Deterministic, stratified, grouped train/validation/test assignment, and a report of what leaks.

Three things tie images together, and every split that *we* draw assigns whole linked groups:

* **exact copies**: the same decoded pixels (the Kermany X-rays have 30 byte-identical pairs, SARS-CoV-2
  CT a few more);
* **near copies**: re-encoded, resized or re-windowed versions of one image
  (:mod:`medjax.data.near_duplicates`);
* **one patient**: a grouping key per item (e.g. ``person1234`` parsed from Kermany's file names), so
  every image of a patient lands on one side of every split, validation carved from train included.

Official splits published with a dataset are the benchmark other papers report on; they are kept exactly
as published, and what links them (exact copies, near copies, shared keys) is counted in the report
(PneumoniaMNIST and BreastMNIST really have exact copies across splits) instead of being silently moved.
``drop_duplicates=True`` keeps one copy per exact group (the one in the most held-out split: test, then
validation, then train), which removes exact leaks.

Group allocation: within each class (a linked group's majority label), groups are shuffled with
``numpy.random.default_rng(seed)`` and laid end to end; a group goes to the split in which its midpoint
falls, with per-class split sizes rounded by largest remainder. With no links this gives exact
stratified counts. Cross-validation folds (``cv_folds``) are allocated the same way over everything that
is not test, and so is a labelled subset of train (``train_examples``, for learning curves and pretrained
starts judged at a few hundred labels): the groups of each class in one seeded order, cut where the
subset's share ends, so a smaller subset is a part of every larger one and validation is unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

SPLITS = ("train", "validation", "test")
_HOLDOUT_PRIORITY = {"test": 0, "validation": 1, "train": 2}


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """Result of :func:`plan_splits`.

    Attributes:
      assignment: split name per input item, or None for a dropped duplicate.
      report: JSON-serialisable summary (duplicate groups, straddling groups, counts per split/class).
    """

    assignment: tuple[str | None, ...]
    report: dict


def group_ids(hashes: Sequence[str]) -> np.ndarray:
    """Maps content hashes to group ids, numbered in order of first occurrence."""
    first: dict[str, int] = {}
    return np.array([first.setdefault(h, len(first)) for h in hashes], dtype=np.int64)


def largest_remainder(total: int, fractions: Sequence[float]) -> list[int]:
    """Splits ``total`` into integer parts proportional to ``fractions`` (which sum to 1).

    Ties go to the earlier part; remainders are rounded first so that float noise (12 * 0.7 =
    8.3999...) cannot break a tie.
    """
    raw = [total * f for f in fractions]
    parts = [int(np.floor(round(r, 9))) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (round(parts[i] - raw[i], 9), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def linked_groups(n: int, *, equal: Sequence[Sequence], pairs: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """Group id per item (numbered by first member), joining items that share a non-None value in any of
    the per-item sequences ``equal``, and the index ``pairs``, transitively."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    for values in equal:
        first: dict = {}
        for i, value in enumerate(values):
            if value is not None:
                join(first.setdefault(value, i), i)
    for i, j in pairs:
        join(i, j)
    return group_ids([str(find(i)) for i in range(n)])


def _allocate(
    members: Mapping[int, list[int]],
    labels: Sequence[int],
    fractions: Mapping[str, float],
    rng: np.random.Generator,
) -> dict[int, str]:
    """Assigns each group id in ``members`` to a split, stratified by the group's majority label."""
    names = list(fractions)
    by_label: dict[int, list[int]] = collections.defaultdict(list)
    for gid in sorted(members):
        majority = collections.Counter(int(labels[i]) for i in members[gid]).most_common(1)[0][0]
        by_label[majority].append(gid)
    out: dict[int, str] = {}
    for label in sorted(by_label):
        groups = [by_label[label][i] for i in rng.permutation(len(by_label[label]))]
        sizes = [len(members[g]) for g in groups]
        bounds = np.cumsum(largest_remainder(sum(sizes), [fractions[n] for n in names]))
        start = 0
        for gid, size in zip(groups, sizes, strict=True):
            midpoint = start + size / 2.0
            out[gid] = names[min(int(np.searchsorted(bounds, midpoint, side="right")), len(names) - 1)]
            start += size
    return out


def _assign(split: list, pool: list[int], groups: np.ndarray, labels, fractions, rng) -> None:
    """Allocates the linked groups of the items in ``pool`` (in place in ``split``)."""
    members: dict[int, list[int]] = collections.defaultdict(list)
    for i in pool:
        members[groups[i]].append(i)
    chosen = _allocate(members, labels, fractions, rng)
    for gid, idx in members.items():
        for i in idx:
            split[i] = chosen[gid]


def _train_subset(split: list, keep: np.ndarray, groups: np.ndarray, labels, size: int, seed: int) -> dict:
    """Leaves all but about ``size`` train items out (``keep`` False, in place); returns what was kept.

    Raises:
      ValueError: for more items than the training split holds (a subset cannot grow it).
    """
    pool = [i for i in range(len(split)) if keep[i] and split[i] == "train"]
    if size > len(pool):
        raise ValueError(
            f"train_examples={size}, but the training split holds {len(pool)} items: give at most "
            f"{len(pool)}, or 0 for all of them."
        )
    if size < len(pool):
        share = {"train": size / len(pool), "unused": 1.0 - size / len(pool)}
        _assign(split, pool, groups, labels, share, np.random.default_rng(seed))
        for i in pool:
            if split[i] == "unused":
                keep[i], split[i] = False, None
    kept = sum(1 for i in pool if keep[i])
    return {"requested": size, "kept": kept, "of": len(pool)}


def _check_fractions(fractions: Mapping[str, float]) -> None:
    unknown = set(fractions) - set(SPLITS)
    if unknown or "train" not in fractions:
        raise ValueError(f"split fractions need 'train' and only keys from {SPLITS}, got {dict(fractions)}")
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")


def plan_splits(
    *,
    labels: Sequence[int],
    hashes: Sequence[str],
    official: Sequence[str] | None = None,
    fractions: Mapping[str, float] | None = None,
    validation_fraction: float | None = 0.1,
    min_validation: int = 50,
    seed: int = 0,
    drop_duplicates: bool = False,
    keys: Sequence[str | None] | None = None,
    near_pairs: Sequence[tuple[int, int]] = (),
    ids: Sequence[str] | None = None,
    cv_folds: int = 0,
    cv_fold: int = 0,
    train_examples: int = 0,
) -> SplitPlan:
    """Assigns items to splits.

    Args:
      labels: integer class per item.
      hashes: content hash per item (:func:`medjax.data.images.pixel_hash`).
      official: published split per item ('train' | 'validation' | 'test'), or None when the dataset has
        no official split. Official train and test are kept as published.
      fractions: split -> fraction used when ``official`` is None; default 70/10/20 train/validation/test.
      validation_fraction: share of the official train items carved out as validation when the official
        validation split is absent or tiny (fewer than ``min_validation`` items or under 1 % of train);
        a tiny official validation split is merged into train before carving. None keeps the official
        validation split whatever its size.
      min_validation: see ``validation_fraction``.
      seed: seed of the shuffles; same inputs and seed give the same plan.
      drop_duplicates: keep only one item per exact duplicate group (the most held-out copy).
      keys: grouping key per item (a patient), None where an item has none; items sharing a key are
        never separated by a split drawn here.
      near_pairs: index pairs of near-duplicate images (:func:`medjax.data.near_duplicates.find_pairs`),
        likewise never separated.
      ids: item names, used to list examples of leaks in the report.
      cv_folds: when >= 2, everything that is not test is re-split into this many grouped, stratified
        folds; fold ``cv_fold`` becomes validation and the others train.
      cv_fold: see ``cv_folds``.
      train_examples: when > 0, keep about this many train items (whole linked groups, stratified by
        class; exact when no group has several items) and leave the others out of every split.

    Returns:
      A :class:`SplitPlan`.
    """
    n = len(labels)
    if any(x is not None and len(x) != n for x in (hashes, official, keys, ids)):
        raise ValueError("labels, hashes, official, keys and ids must have the same length")
    if cv_folds and not (cv_folds >= 2 and 0 <= cv_fold < cv_folds):
        raise ValueError(f"cv_folds must be >= 2 and 0 <= cv_fold < cv_folds, got {cv_folds}, {cv_fold}")
    if train_examples < 0:
        raise ValueError(f"train_examples must be >= 0 (0: all), got {train_examples}")
    exact = group_ids(hashes)
    linked = linked_groups(n, equal=[hashes, keys or [None] * n], pairs=near_pairs)
    rng = np.random.default_rng(seed)
    split = list(official) if official is not None else [None] * n
    keep = np.ones(n, bool)
    if drop_duplicates:
        best: dict[int, int] = {}
        for i in range(n):
            j = best.get(exact[i])
            if j is None or _HOLDOUT_PRIORITY.get(split[i], 3) < _HOLDOUT_PRIORITY.get(split[j], 3):
                best[exact[i]] = i
        keep[:] = False
        keep[list(best.values())] = True

    validation_source = "official"
    if official is None:
        fractions = dict(fractions or {"train": 0.7, "validation": 0.1, "test": 0.2})
        _check_fractions(fractions)
        _assign(split, [i for i in range(n) if keep[i]], linked, labels, fractions, rng)
        validation_source = "random"
    else:
        unknown = set(official) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown official split names {sorted(unknown)}; expected {SPLITS}")
        n_train = sum(1 for i in range(n) if keep[i] and split[i] == "train")
        n_val = sum(1 for i in range(n) if keep[i] and split[i] == "validation")
        if validation_fraction is not None and (n_val < min_validation or n_val < 0.01 * n_train):
            if not 0.0 < validation_fraction < 1.0:
                raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
            carve = {"train": 1.0 - validation_fraction, "validation": validation_fraction}
            pool = [i for i in range(n) if keep[i] and split[i] in ("train", "validation")]
            _assign(split, pool, linked, labels, carve, rng)
            validation_source = f"carved from train ({n_val} official validation items merged into train)"
    if cv_folds:
        folds = {f"fold{k}": 1.0 / cv_folds for k in range(cv_folds)}
        pool = [i for i in range(n) if keep[i] and split[i] != "test"]
        _assign(split, pool, linked, labels, folds, np.random.default_rng(seed))
        split = [("validation" if s == f"fold{cv_fold}" else "train") if s in folds else s for s in split]
        validation_source = f"fold {cv_fold} of {cv_folds} over everything but test (grouped, stratified)"
    duplicates_dropped = int(n - keep.sum())
    subset = _train_subset(split, keep, linked, labels, train_examples, seed) if train_examples else None
    assignment = tuple(split[i] if keep[i] else None for i in range(n))
    report = _report(labels, exact, assignment, validation_source, duplicates_dropped)
    if subset is not None:
        report["train_subset"] = subset
    report.update(_links_report(assignment, keys, near_pairs, exact, ids))
    return SplitPlan(assignment, report)


def _report(
    labels: Sequence[int],
    groups: np.ndarray,
    assignment: Sequence[str | None],
    validation_source: str,
    duplicates_dropped: int,
) -> dict:
    sizes = np.bincount(groups)
    splits_of: dict[int, set] = collections.defaultdict(set)
    labels_of: dict[int, set] = collections.defaultdict(set)
    counts: dict[str, dict[int, int]] = {}
    for i, (gid, name) in enumerate(zip(groups, assignment, strict=True)):
        labels_of[gid].add(int(labels[i]))
        if name is not None:
            splits_of[gid].add(name)
            per_class = counts.setdefault(name, {})
            per_class[int(labels[i])] = per_class.get(int(labels[i]), 0) + 1
    return {
        "items": len(assignment),
        "groups": len(sizes),
        "duplicate_groups": int((sizes > 1).sum()),
        "duplicate_items": int((sizes - 1).sum()),
        "duplicates_dropped": duplicates_dropped,
        "label_conflict_groups": sum(len(v) > 1 for v in labels_of.values()),
        "label_conflict_items": int(sum(sizes[gid] for gid, v in labels_of.items() if len(v) > 1)),
        "straddling_groups": sum(len(v) > 1 for v in splits_of.values()),
        "validation_source": validation_source,
        "counts": {name: dict(sorted(counts[name].items())) for name in SPLITS if name in counts},
    }


def _links_report(
    assignment: Sequence[str | None],
    keys: Sequence[str | None] | None,
    near_pairs: Sequence[tuple[int, int]],
    exact: np.ndarray,
    ids: Sequence[str] | None,
    max_examples: int = 20,
) -> dict:
    """Patients and near-duplicates, and those of them that sit in more than one split (a leak when the
    splits are drawn here is impossible, so any count above zero is in the official splits)."""
    name = (lambda i: ids[i]) if ids is not None else (lambda i: i)
    near = [(i, j) for i, j in near_pairs if exact[i] != exact[j]]  # Exact copies are counted above.
    placed = [(i, j) for i, j in near if None not in (assignment[i], assignment[j])]
    across = [(i, j) for i, j in placed if assignment[i] != assignment[j]]
    report = {
        "near_duplicate_pairs": len(near),
        "straddling_near_duplicate_pairs": len(across),
        "near_duplicate_examples": [[name(i), name(j)] for i, j in near[:max_examples]],
        "straddling_near_duplicate_examples": [
            {name(i): assignment[i], name(j): assignment[j]} for i, j in across[:max_examples]
        ],
    }
    if keys is not None:
        members: dict[str, list[int]] = collections.defaultdict(list)
        for i, key in enumerate(keys):
            if key is not None and assignment[i] is not None:
                members[key].append(i)
        straddling = {k: v for k, v in members.items() if len({assignment[i] for i in v}) > 1}
        report.update(
            {
                "patients": len(members),
                "patients_with_several_images": sum(len(v) > 1 for v in members.values()),
                "items_without_key": sum(k is None for k in keys),
                "straddling_patients": len(straddling),
                "straddling_patient_examples": {
                    k: sorted({assignment[i] for i in v}) for k, v in list(straddling.items())[:max_examples]
                },
            }
        )
    return report
