"""Deterministic, stratified, duplicate-aware train/validation/test assignment.

Real archives contain identical images (the Kermany X-rays have 30 byte-identical pairs, SARS-CoV-2 CT a
few more). If two copies land in train and test, test accuracy is inflated. So items are grouped by the
content hash of their decoded pixels and every split that *we* draw assigns whole groups. Official splits
published with a dataset are the benchmark other papers report on; they are kept exactly as published,
and duplicates that straddle them are counted in the report (PneumoniaMNIST and BreastMNIST really have
some) instead of being silently moved. ``drop_duplicates=True`` keeps one copy per group (the one in the
most held-out split: test, then validation, then train), which also removes such leaks.

Group allocation: within each class, groups are shuffled with ``numpy.random.default_rng(seed)`` and laid
end to end; a group goes to the split in which its midpoint falls, with per-class split sizes rounded by
largest remainder. With no duplicates this gives exact stratified counts.
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


def _allocate(
    members: Mapping[int, list[int]],
    group_label: Mapping[int, int],
    fractions: Mapping[str, float],
    rng: np.random.Generator,
) -> dict[int, str]:
    """Assigns each group id in ``members`` to a split, stratified by the group's label."""
    names = list(fractions)
    by_label: dict[int, list[int]] = collections.defaultdict(list)
    for gid in sorted(members):
        by_label[group_label[gid]].append(gid)
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
      drop_duplicates: keep only one item per duplicate group (the most held-out copy).

    Returns:
      A :class:`SplitPlan`.
    """
    n = len(labels)
    if len(hashes) != n or (official is not None and len(official) != n):
        raise ValueError("labels, hashes and official must have the same length")
    groups = group_ids(hashes)
    rng = np.random.default_rng(seed)
    split = list(official) if official is not None else [None] * n
    keep = np.ones(n, bool)
    if drop_duplicates:
        best: dict[int, int] = {}
        for i in range(n):
            j = best.get(groups[i])
            if j is None or _HOLDOUT_PRIORITY.get(split[i], 3) < _HOLDOUT_PRIORITY.get(split[j], 3):
                best[groups[i]] = i
        keep[:] = False
        keep[list(best.values())] = True

    validation_source = "official"
    if official is None:
        fractions = dict(fractions or {"train": 0.7, "validation": 0.1, "test": 0.2})
        _check_fractions(fractions)
        pool = [i for i in range(n) if keep[i]]
        validation_source = "random"
    else:
        unknown = set(official) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown official split names {sorted(unknown)}; expected {SPLITS}")
        n_train = sum(1 for i in range(n) if keep[i] and split[i] == "train")
        n_val = sum(1 for i in range(n) if keep[i] and split[i] == "validation")
        pool = []
        if validation_fraction is not None and (n_val < min_validation or n_val < 0.01 * n_train):
            if not 0.0 < validation_fraction < 1.0:
                raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
            fractions = {"train": 1.0 - validation_fraction, "validation": validation_fraction}
            pool = [i for i in range(n) if keep[i] and split[i] in ("train", "validation")]
            validation_source = f"carved from train ({n_val} official validation items merged into train)"
    if pool:
        members: dict[int, list[int]] = collections.defaultdict(list)
        for i in pool:
            members[groups[i]].append(i)
        group_label = {gid: labels[idx[0]] for gid, idx in members.items()}
        chosen = _allocate(members, group_label, fractions, rng)
        for gid, idx in members.items():
            for i in idx:
                split[i] = chosen[gid]
    assignment = tuple(split[i] if keep[i] else None for i in range(n))
    return SplitPlan(assignment, _report(labels, groups, assignment, validation_source, drop_duplicates))


def _report(
    labels: Sequence[int],
    groups: np.ndarray,
    assignment: Sequence[str | None],
    validation_source: str,
    drop_duplicates: bool,
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
        "duplicates_dropped": sum(name is None for name in assignment) if drop_duplicates else 0,
        "label_conflict_groups": sum(len(v) > 1 for v in labels_of.values()),
        "label_conflict_items": int(sum(sizes[gid] for gid, v in labels_of.items() if len(v) > 1)),
        "straddling_groups": sum(len(v) > 1 for v in splits_of.values()),
        "validation_source": validation_source,
        "counts": {name: dict(sorted(counts[name].items())) for name in SPLITS if name in counts},
    }
