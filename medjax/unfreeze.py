"""Selective unfreezing as a schedule (study C): which parameters train in which phase, and when each
phase starts.

``config.optim.unfreeze`` is a sequence of phases, each a dict with ``trainable`` (regexes over
``'/'``-joined parameter paths, as ``optim.trainable``; ``None`` = every parameter) and how it starts:

* ``{'epoch': 0, 'trainable': (...)}``: at that epoch (the first phase must start at epoch 0);
* ``{'plateau': 2, 'trainable': (...)}``: once the previous phase has gone that many evaluations
  without improving the early-stopping metric (``train.early_stopping.monitor`` and ``min_delta``).

Phases start in order. Each parameter (and BatchNorm statistic) carries a small constant table "trains
in phase p" (:func:`medjax.optim.trainable_tables`), and the optimizer is gated on the phase
(:func:`medjax.optim.make_optimizer`). The phase is a static argument of the jitted train step, so the
step compiles once per phase, and each phase's step puts what it freezes behind ``stop_gradient``
(:func:`medjax.train_step.train_step`): a head-only phase does not pay for the backward pass through the
frozen backbone.
The loop's phase and plateau counter go into the run's checkpoint (:meth:`PhaseTracker.state`), so a
run resumed mid-schedule continues in the phase it was in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from medjax.early_stopping import EarlyStopping
from medjax.errors import ConfigError

_KEYS = frozenset({"epoch", "plateau", "trainable"})


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase: its trainable patterns (None: all) and its start (an epoch, or a plateau length)."""

    trainable: tuple[str, ...] | None
    epoch: float | None = None
    plateau: int | None = None


def parse(spec: Sequence[Mapping] | None) -> tuple[Phase, ...] | None:
    """Checks ``config.optim.unfreeze`` and returns its phases (None when unset).

    Raises:
      ConfigError: naming the phase and what is wrong with it.
    """
    if spec is None:
        return None
    if isinstance(spec, Mapping) or not isinstance(spec, Sequence) or not spec:
        raise ConfigError(
            "optim.unfreeze must be a non-empty sequence of phases, e.g. ({'epoch': 0, 'trainable': "
            "('classifier/.*',)}, {'epoch': 2, 'trainable': None}); got " + repr(spec)
        )
    phases = []
    for i, raw in enumerate(spec):
        where = f"optim.unfreeze[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"{where} must be a dict with 'trainable' and 'epoch' or 'plateau', got {raw!r}"
            )
        unknown = sorted(set(raw) - _KEYS)
        if unknown or "trainable" not in raw:
            raise ConfigError(
                f"{where} has keys {sorted(raw)}; a phase has 'trainable' (patterns or None) and one of "
                "'epoch' (start epoch) or 'plateau' (evaluations without improvement that end the previous "
                "phase)."
            )
        starts = [k for k in ("epoch", "plateau") if raw.get(k) is not None]
        if len(starts) != 1:
            raise ConfigError(f"{where} needs exactly one of 'epoch' or 'plateau', got {dict(raw)}")
        trainable = raw["trainable"]
        if isinstance(trainable, str):
            raise ConfigError(f"{where}.trainable must be a sequence of patterns or None, not a string")
        trainable = None if trainable is None else tuple(trainable)
        if starts == ["epoch"]:
            epoch = float(raw["epoch"])
            if i == 0 and epoch != 0.0:
                raise ConfigError(f"{where} must start at epoch 0 (the first phase trains from the start)")
            if i and phases[-1].epoch is not None and epoch <= phases[-1].epoch:
                raise ConfigError(f"{where} starts at epoch {epoch}, not after the previous phase")
            phases.append(Phase(trainable, epoch=epoch))
        else:
            plateau = raw["plateau"]
            if i == 0:
                raise ConfigError(f"{where}: the first phase starts at epoch 0, not on a plateau")
            if not isinstance(plateau, int) or isinstance(plateau, bool) or plateau < 1:
                raise ConfigError(
                    f"{where}.plateau must be a positive number of evaluations, got {plateau!r}"
                )
            phases.append(Phase(trainable, plateau=plateau))
    return tuple(phases)


class PhaseTracker:
    """The training loop's view of the schedule: the current phase, advanced by step or by plateau.

    ``state()`` goes into the checkpoint's loop state; passing it back as ``state`` resumes the phase
    and the plateau count exactly.
    """

    def __init__(
        self,
        phases: Sequence[Phase],
        *,
        steps_per_epoch: int,
        monitor: str,
        min_delta: float,
        state: Mapping | None = None,
    ):
        self.phases = tuple(phases)
        self.steps_per_epoch = steps_per_epoch
        state = dict(state or {})
        self.phase = int(state.get("phase", 0))
        self._plateau = EarlyStopping(
            monitor=monitor, patience=0, min_delta=min_delta, state=state.get("plateau")
        )

    def start_step(self, phase: int) -> int | None:
        """The step at which an epoch-triggered ``phase`` starts (None for a plateau trigger)."""
        epoch = self.phases[phase].epoch
        return None if epoch is None else math.ceil(epoch * self.steps_per_epoch)

    def at_step(self, step: int) -> bool:
        """Advances through epoch-triggered phases due by ``step`` (completed steps); True on a change."""
        changed = False
        while self.phase + 1 < len(self.phases):
            start = self.start_step(self.phase + 1)
            if start is None or step < start:
                break
            self._enter(self.phase + 1)
            changed = True
        return changed

    def after_evaluation(self, value: float) -> bool:
        """Records a validation value; enters the next phase when its plateau is reached (True then)."""
        self._plateau.update(value)
        if self.phase + 1 < len(self.phases):
            needed = self.phases[self.phase + 1].plateau
            if needed is not None and self._plateau.bad_evals >= needed:
                self._enter(self.phase + 1)
                return True
        return False

    def _enter(self, phase: int) -> None:
        self.phase = phase
        self._plateau.bad_evals = 0  # A plateau is counted within one phase.

    def describe(self) -> str:
        trainable = self.phases[self.phase].trainable
        return f"unfreeze phase {self.phase}: training {'all parameters' if trainable is None else trainable}"

    def state(self) -> dict:
        return {"phase": self.phase, "plateau": self._plateau.state()}
