"""The guard every model output passes before it leaves the program (evaluation, prediction, export).

A damaged checkpoint can hold NaN weights; softmax of NaN logits is NaN, ``argmax`` of NaN picks class 0,
and a CSV of NaN probabilities labelled with the first class looks like a result. So outputs are checked
where they leave, and a non-finite one stops the command naming what produced it.
"""

import numpy as np

from medjax.errors import NonFiniteOutputError


def check_outputs(probs: np.ndarray, *, what: str) -> None:
    """Raises when any example of ``probs`` (N, ...) holds NaN or infinity.

    Args:
      probs: per-example model outputs (class probabilities, logits, segmentation maps).
      what: what produced them, for the message (e.g. ``"run runs/x, best checkpoint step 40"``).

    Raises:
      NonFiniteOutputError: naming ``what`` and how many examples are affected; nothing was written.
    """
    probs = np.asarray(probs)
    bad = ~np.isfinite(probs.reshape(len(probs), -1)).all(axis=1) if probs.size else np.zeros(0, bool)
    if bad.any():
        raise NonFiniteOutputError(
            f"{what} produced NaN or infinite outputs for {int(bad.sum())} of {len(probs)} examples; "
            "nothing was written. The checkpoint is probably damaged: retrain, or restore it from a copy."
        )
