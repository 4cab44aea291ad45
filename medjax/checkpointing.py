"""Orbax checkpoints of a run: the latest few (to resume) and the best on validation (to use).

``<workdir>/checkpoints/latest/<step>/`` holds the train state, the Grain iterator position and a JSON
record of the loop's own state (early stopping, best metric), so a killed run restarts exactly where
its last checkpoint left it, with no RNG to store (step RNGs are ``fold_in(seed, step)``).
``<workdir>/checkpoints/best/<step>/`` holds only what inference needs (params and BatchNorm statistics)
of the evaluation with the best monitored validation metric.

Crash consistency. Orbax writes each step into a temporary directory and renames it when complete, so
a kill mid-save leaves no partial step (leftover temporary directories are removed on the next start).
Two series cannot be renamed together, though: at an evaluation the best step is saved, then the
latest one, and a kill in between leaves ``best/N`` without ``latest/N``. The resumed run replays from an
earlier step and would reach N again, where Orbax refuses to save a step twice. So
:meth:`RunCheckpointer.restore_latest` repairs the workdir first: best steps newer than the step it
resumes from are deleted, and the replay (bit-exact, see :mod:`medjax.train_step`) saves them again. This is
also why deleting a ``best/N`` loses nothing: it was the best of every evaluation up to N, all of which
the replay redoes or has already compared against.

Unreadable checkpoints. A latest step whose files cannot be read (a JSON file that does not parse, tensor
data Orbax rejects, or values that are not finite) is named with the file and the reason, deleted, and
the next older step is tried; the run says which step it resumed from. A corrupt best checkpoint raises
:class:`~medjax.errors.CheckpointError` naming it, rather than producing NaN predictions.
"""

import contextlib
import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from medjax.errors import CheckpointError

# Test-only fault injection (tests/test_faults.py): ``MEDJAX_FAULT_AT=<point>:<step>`` kills this process
# with SIGKILL at that point of a save, e.g. ``after_best_save:4`` between the best and latest saves of
# step 4. Points: before_best_save, after_best_save, before_latest_save, after_latest_save.
FAULT_ENV = "MEDJAX_FAULT_AT"


def _fault_point(point: str, step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def has_checkpoints(directory: Path) -> bool:
    """Whether ``<workdir>/checkpoints`` holds a finished step of either series (a workdir without one has
    finished nothing, so a changed config can take it over)."""
    return any(
        p.name.isdigit() for series in ("latest", "best") for p in (Path(directory) / series).glob("*")
    )


class RunCheckpointer:
    """Latest-N and best-on-validation Orbax checkpoint series of one run.

    Args:
      directory: ``<workdir>/checkpoints``.
      keep: how many latest checkpoints to keep.
      best_metric: key of the metrics dict given to :meth:`save_best`.
      best_mode: 'min' or 'max' for ``best_metric``.
    """

    def __init__(self, directory: Path, *, keep: int, best_metric: str, best_mode: str):
        directory = Path(directory).absolute()
        # Synchronous saves: the state is donated to the next train step, and on CPU a save is short.
        self.latest = ocp.CheckpointManager(
            directory / "latest",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
            ),
        )
        self.best = ocp.CheckpointManager(
            directory / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=True,
                best_fn=lambda metrics: metrics[best_metric],
                best_mode=best_mode,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, *, state: Any, loop_state: dict, data_iterator: Any = None) -> None:
        """Saves everything needed to resume after ``step`` completed steps.

        Every process calls it (a collective save: each writes the array shards it owns, process 0 the
        metadata). ``data_iterator`` is saved only when given: medjax's loaders re-derive their
        position from the step instead (:func:`medjax.data.pipeline.make_train_loader`), which keeps a
        checkpoint restorable with another number of processes or Grain workers.
        """
        items = {"state": ocp.args.StandardSave(state), "loop": ocp.args.JsonSave(loop_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        _fault_point("before_latest_save", step)
        with _os_errors(self.latest.directory):
            self.latest.save(step, args=ocp.args.Composite(**items), force=True)
        _fault_point("after_latest_save", step)

    def restore(self, step: int, *, abstract_state: Any, data_iterator: Any = None) -> tuple[Any, dict]:
        """Restores the state (shaped and sharded like ``abstract_state``) and the iterator in place.

        Returns:
          ``(state, loop_state)``.

        Raises:
          CheckpointError: naming the file that cannot be read, or the step whose values are not finite.
        """
        step_dir = Path(self.latest.directory) / str(step)
        _check_json_files(step_dir)
        # Read into abstract_state's shardings (the current mesh's): a checkpoint written on 4 devices
        # or 2 processes restores on 1 device and the other way round.
        items = {"state": ocp.args.StandardRestore(abstract_state), "loop": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.latest.restore(
                step,
                args=ocp.args.Composite(**items),
            )
        except Exception as e:  # Orbax and TensorStore raise many types for damaged files.
            raise CheckpointError(f"{step_dir}: unreadable checkpoint ({_brief(e)})") from e
        _check_finite(restored["state"], step_dir / "state")
        return restored["state"], dict(restored["loop"])

    def restore_latest(
        self, *, abstract_state: Any, data_iterator: Any = None, say: Callable[[str], None] = print
    ) -> tuple[int, Any, dict]:
        """Restores the newest readable latest step, repairing the workdir for the replay from it.

        Unreadable steps are reported through ``say`` (naming the file and reason) and deleted; best steps
        newer than the step resumed from are deleted (the module docstring says why that is safe).

        Returns:
          ``(step, state, loop_state)``; step 0 with ``abstract_state`` itself and ``{}`` when no step is
          readable (a fresh start).
        """
        step, state, loop_state = 0, abstract_state, {}
        # A failed restore may have moved the iterator.
        fresh_position = data_iterator.get_state() if data_iterator is not None else None
        for candidate in sorted(self.latest.all_steps(), reverse=True):
            try:
                state, loop_state = self.restore(
                    candidate, abstract_state=abstract_state, data_iterator=data_iterator
                )
            except CheckpointError as e:
                say(f"Checkpoint at step {candidate} is unusable and is deleted: {e}")
                self.latest.delete(candidate)
                continue
            step = candidate
            break
        else:
            if data_iterator is not None:
                data_iterator.set_state(fresh_position)
        for newer in [s for s in self.best.all_steps() if s > step]:
            say(f"Best checkpoint at step {newer} is newer than the resumed step {step}; it is redone.")
            self.best.delete(newer)
        self.best.reload()
        return step, state, loop_state

    def save_best(self, step: int, *, variables: Any, metrics: dict) -> None:
        """Offers ``variables`` as the best checkpoint; Orbax keeps it only if ``metrics`` is better."""
        _fault_point("before_best_save", step)
        with _os_errors(self.best.directory):
            self.best.save(
                step,
                args=ocp.args.Composite(variables=ocp.args.StandardSave(variables)),
                metrics=metrics,
                force=True,
            )
        _fault_point("after_best_save", step)

    def best_step(self) -> int | None:
        return self.best.best_step()

    def restore_best(self, *, abstract_variables: Any) -> Any:
        """The best checkpoint's variables.

        Raises:
          CheckpointError: naming the file that cannot be read, or the checkpoint if its values are not
            finite (a damaged file would otherwise turn into NaN predictions).
        """
        step = self.best.best_step()
        step_dir = Path(self.best.directory) / str(step)
        _check_json_files(step_dir)
        try:
            restored = self.best.restore(
                step, args=ocp.args.Composite(variables=ocp.args.StandardRestore(abstract_variables))
            )
        except Exception as e:  # Orbax and TensorStore raise many types for damaged files.
            raise CheckpointError(f"{step_dir}: unreadable checkpoint ({_brief(e)})") from e
        _check_finite(restored["variables"], step_dir / "variables")
        return restored["variables"]

    def close(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        self.latest.close()
        self.best.close()


def _check_json_files(step_dir: Path) -> None:
    """Parses every JSON file of a checkpoint step, so a damaged one is named (Orbax and Grain raise a
    bare ``JSONDecodeError`` that names no file)."""
    candidates = [step_dir / "_CHECKPOINT_METADATA"]
    for item in sorted(p for p in step_dir.iterdir() if p.is_dir()) if step_dir.is_dir() else []:
        candidates += [item / n for n in ("_METADATA", "_sharding", "metadata")]
        candidates += sorted(item.glob("*.json")) + sorted(item.glob("array_metadatas/*"))
    for path in candidates:
        if not path.is_file():
            continue
        try:
            json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable JSON ({e})") from e


@contextlib.contextmanager
def _os_errors(directory: Any) -> Iterator[None]:
    """Turns TensorStore's report of an operating-system failure (a full disk: ``RESOURCE_EXHAUSTED ...
    [os_error_code='28']``) back into the ``OSError`` it is, naming the checkpoint directory, so the
    command reports it as such instead of as a library error. Orbax leaves no partial step behind."""
    try:
        yield
    except ValueError as e:
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), os.fspath(directory)) from e


def _brief(error: Exception) -> str:
    """The first line of a library error, cut to a readable length (TensorStore's run to pages)."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:300]}{'...' if len(first) > 300 else ''}"


def _check_finite(tree: Any, where: Path) -> None:
    """Raises when a floating-point leaf holds NaN or infinity (a damaged tensor file, not training:
    training stops before saving non-finite values)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        value = np.asarray(jax.device_get(leaf))
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            name = jax.tree_util.keystr(path)
            raise CheckpointError(
                f"{where}: {name} holds NaN or infinite values (a damaged checkpoint file)."
            )
