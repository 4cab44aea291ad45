"""The locked test protocol: which recipe was evaluated on test, from which commit, and when first.

A recipe is chosen on validation or cross-validation numbers (``launch/cross_validate.py``); the test
split is then evaluated once per final recipe, by ``launch/reproduce.py``. Memory is not a protocol, so
every test evaluation is written to a ledger kept in the repository (``results/test_ledger.json``):
per experiment, the recipe's digest (:func:`recipe_digest`: the resolved config, minus where files live
and how the run is watched), the last commit that touched its config file, the date test was first
evaluated for it and how many times. Evaluating test again for the *same* recipe (a rerun) only counts;
for a *changed* recipe it is peeking, refused unless asked for, and then recorded as a new entry after
the old one, so RESULTS.md shows that test was seen before the recipe was settled.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

from medjax import config_lib

# Keys that say where data and runs live or how a run is watched, not what it learns; a cross-validation
# fold and the final run of one recipe differ only in these.
NOT_RECIPE = (
    *config_lib.RESUMABLE_WITH_CHANGES,
    "data.test_split",
    "data.builder_kwargs.cv_folds",
    "data.builder_kwargs.cv_fold",
    "init_from.path",  # Where the source run sits; which experiment it is belongs to the experiment.
    "seed",  # An experiment's seeds are part of the experiment, not of the recipe.
)
# Dataset options medjax gained after recipes were recorded, at the value that keeps what a recipe without
# them did: left out of the recipe there, so recorded digests stay valid; any other value is another recipe.
GAINED_AT_NEUTRAL = {"data.builder_kwargs.train_examples": 0}


def recipe(config: Mapping, **extra) -> dict:
    """The flat recipe of a config dict: every dotted key except :data:`NOT_RECIPE`, with the dataset
    builder's defaults filled in (a changed default, e.g. how validation is carved, changes the recipe),
    and ``extra`` facts of the experiment (e.g. its seeds) as ``experiment.<key>``."""
    from medjax.data import builders  # Imports TFDS: only when a digest is asked for.

    config = json.loads(json.dumps(config, default=str))
    data = config.get("data", {})
    if data.get("name") in builders.available_datasets():
        defaults = json.loads(json.dumps(builders.accepted_kwargs(data["name"]), default=list))
        data["builder_kwargs"] = {**defaults, **(data.get("builder_kwargs") or {})}
    flat = config_lib.flatten(config)
    keys = {k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in NOT_RECIPE)}
    keys = {k: v for k, v in keys.items() if k not in GAINED_AT_NEUTRAL or v != GAINED_AT_NEUTRAL[k]}
    keys.update({f"experiment.{k}": json.loads(json.dumps(v, default=list)) for k, v in extra.items()})
    return dict(sorted(keys.items()))


def digest(keys: Mapping) -> str:
    """12 hex digits naming a flat recipe."""
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:12]


def recipe_digest(config: Mapping, **extra) -> str:
    """The digest of :func:`recipe`."""
    return digest(recipe(config, **extra))


def changed_keys(old: Mapping, new: Mapping) -> list[str]:
    """Recipe keys whose values differ; a key ``old`` lacks that ``new`` holds at its
    :func:`medjax.config_lib.base_config` default is no change (medjax gained the key, not the recipe)."""
    defaults = config_lib.flatten(json.loads(config_lib.to_json(config_lib.base_config())))
    return sorted(
        k
        for k in set(old) | set(new)
        if old.get(k, "<absent>") != new.get(k, "<absent>")
        and not (k not in old and k in defaults and new.get(k) == defaults[k])
    )


def last_commit(path: str | Path, *, repo: str | Path) -> str:
    """Short hash of the last commit touching ``path``, with ``+dirty`` when it has uncommitted changes;
    ``'unknown'`` outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "log", "-1", "--format=%h", "--", str(path)],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", str(path)],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return (commit or "uncommitted") + ("+dirty" if dirty else "")  # fmt: skip


class RecipeChangedError(RuntimeError):
    """Test was already evaluated for another recipe of this experiment."""


class TestLedger:
    """``{experiment: [entry, ...]}`` in a JSON file; the last entry is the current recipe.

    An entry: ``recipe`` (digest) and ``keys`` (the flat recipe), ``commit``, ``first_test`` (UTC date and
    time), ``evaluations``, ``after`` (the digests evaluated on test before it, when the recipe changed
    after test was seen) and an optional ``note``.
    """

    __test__ = False  # Not a pytest class.

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, list[dict]] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def current(self, name: str) -> dict | None:
        history = self.entries.get(name)
        return history[-1] if history else None

    def history(self, name: str) -> list[dict]:
        return list(self.entries.get(name, []))

    def changes(self, name: str, keys: Mapping) -> list[str] | None:
        """Recipe keys changed since test was last evaluated for ``name`` (None: never evaluated)."""
        entry = self.current(name)
        return None if entry is None else changed_keys(entry["keys"], keys)

    def check(self, name: str, keys: Mapping) -> str:
        """'new' (test never evaluated), 'same' (for this recipe) or 'changed' (for another one)."""
        changes = self.changes(name, keys)
        return "new" if changes is None else "changed" if changes else "same"

    def ensure_allowed(self, name: str, keys: Mapping, *, allow_change: bool = False) -> None:
        """Raises RecipeChangedError if evaluating test for recipe ``keys`` would be peeking."""
        changes = self.changes(name, keys)
        if changes and not allow_change:
            first = self.entries[name][-1]
            raise RecipeChangedError(
                f"{name}: test was first evaluated on {first['first_test']} for recipe {first['recipe']} "
                f"(config at commit {first['commit']}); this recipe ({digest(keys)}) differs in "
                f"{', '.join(changes[:8])}{' ...' if len(changes) > 8 else ''}. Evaluating test for a recipe "
                "changed after test was seen is peeking: choose recipes on validation or cross-validation "
                "(launch/cross_validate.py). To evaluate it anyway, and have RESULTS.md say so, pass "
                "--allow_recipe_change."
            )

    def record(self, name: str, *, keys: Mapping, commit: str, allow_change: bool = False, now=None) -> dict:
        """Records one test evaluation of ``name`` with recipe ``keys`` (:func:`recipe`) and saves the
        ledger.

        Raises:
          RecipeChangedError: from :meth:`ensure_allowed` (nothing is recorded).
        """
        self.ensure_allowed(name, keys, allow_change=allow_change)
        history = self.entries.setdefault(name, [])
        if self.check(name, keys) == "same":
            history[-1]["evaluations"] += 1
        else:
            when = now or datetime.datetime.now(datetime.UTC)
            history.append(
                {
                    "recipe": digest(keys),
                    "keys": dict(keys),
                    "commit": commit,
                    "first_test": f"{when:%Y-%m-%d %H:%M} UTC",
                    "evaluations": 1,
                    "after": [e["recipe"] for e in history],
                }
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.entries, indent=2, sort_keys=True) + "\n")
        return history[-1]
