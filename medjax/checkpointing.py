"""Orbax checkpoints of a run: the latest few (to resume) and the best on validation (to use).

``<workdir>/checkpoints/latest/<step>/`` holds the train state and a JSON record of the loop's own state
(early stopping, best metric), so a killed run restarts exactly where its last checkpoint left it, with
no RNG to store (step RNGs are ``fold_in(seed, step)``) and no data iterator state (batch ``k`` is a
function of the seed and ``k``, so the loader restarts at the step).
``<workdir>/checkpoints/best/<step>/`` holds only what inference needs (params and BatchNorm statistics)
of the evaluation with the best monitored validation metric.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact and the partial one is never restored.
"""

from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp


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
                max_to_keep=keep, create=True, enable_async_checkpointing=False
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
        self.latest.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, *, abstract_state: Any, data_iterator: Any = None) -> tuple[Any, dict]:
        """Restores the state shaped and sharded like ``abstract_state`` (and ``data_iterator`` in place
        when given).

        The saved arrays are read into ``abstract_state``'s shardings, those of the current mesh, so a
        checkpoint written on 4 devices or 2 processes restores on 1 device and the other way round.

        Returns:
          ``(state, loop_state)``.
        """
        items = {"state": ocp.args.StandardRestore(abstract_state), "loop": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.latest.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], dict(restored["loop"])

    def save_best(self, step: int, *, variables: Any, metrics: dict) -> None:
        """Offers ``variables`` as the best checkpoint; Orbax keeps it only if ``metrics`` is better."""
        self.best.save(
            step,
            args=ocp.args.Composite(variables=ocp.args.StandardSave(variables)),
            metrics=metrics,
            force=True,
        )

    def best_step(self) -> int | None:
        return self.best.best_step()

    def restore_best(self, *, abstract_variables: Any) -> Any:
        step = self.best.best_step()
        restored = self.best.restore(
            step, args=ocp.args.Composite(variables=ocp.args.StandardRestore(abstract_variables))
        )
        return restored["variables"]

    def close(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        self.latest.close()
        self.best.close()
