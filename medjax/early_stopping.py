"""Early stopping on a validation metric, with state that goes into the run's checkpoint.

A resumed run restores ``state()`` from its checkpoint, so patience counts evaluations across a kill
exactly as an uninterrupted run would.
"""

import math
from collections.abc import Mapping


class EarlyStopping:
    """Counts evaluations without improvement of a validation metric by more than ``min_delta``."""

    def __init__(self, *, monitor: str, patience: int, min_delta: float, state: Mapping | None = None):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.sign = 1.0 if monitor == "loss" else -1.0  # Minimise loss, maximise everything else.
        state = dict(state or {})
        self.best = state.get("best", math.inf)
        self.bad_evals = state.get("bad_evals", 0)

    def update(self, value: float) -> bool:
        """Records one evaluation; returns True when training should stop."""
        signed = self.sign * value
        if signed < self.best - self.min_delta:
            self.best, self.bad_evals = signed, 0
        else:
            self.bad_evals += 1
        return self.patience > 0 and self.bad_evals >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals}
