"""Figures of a segmentation evaluation: the best and worst images (or cases) with their masks drawn on.

Each panel shows the image preview the inference pass kept, the reference outlined in green and the
prediction in red (yellow where both outlines meet), titled with the unit and its mean foreground Dice.
A case is shown by its slice with the most reference foreground. matplotlib's Agg backend through the
object API, as :mod:`medjax.evaluate.figures`.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from medjax.evaluate.figures import _save
from medjax.segmentation_metrics import surface


def overlay(preview: np.ndarray, label: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """RGB uint8 ``preview`` with the outlines of foreground ``label`` (green) and ``prediction`` (red),
    the masks subsampled to the preview's size."""
    h, w = preview.shape[:2]
    stride = -(-label.shape[0] // h)
    ref, pred = (
        surface(label[::stride, ::stride][:h, :w] > 0),
        surface(prediction[::stride, ::stride][:h, :w] > 0),
    )
    rgb = np.repeat(preview, 3, axis=-1) if preview.shape[-1] == 1 else preview.copy()
    rgb[ref] = (0, 255, 0)
    rgb[pred] = (255, 0, 0)
    rgb[ref & pred] = (255, 255, 0)
    return rgb


def plot_best_and_worst(
    out: Path,
    role: str,
    predictions: dict,
    groups: Sequence[np.ndarray],
    unit_names: Sequence[str],
    unit_dice: np.ndarray,
    *,
    count: int,
) -> dict[str, str]:
    """``{'best': file, 'worst': file}``: the ``count`` units of highest and lowest mean foreground Dice
    (units where it is undefined are left out); ``{}`` when there is none or ``count`` is 0."""
    ranked = [u for u in np.argsort(-np.nan_to_num(unit_dice, nan=-1.0)) if not np.isnan(unit_dice[u])]
    if not ranked or count <= 0:
        return {}
    files = {}
    for kind, chosen in (("best", ranked[:count]), ("worst", ranked[::-1][:count])):
        fig = Figure(figsize=(3.2 * len(chosen), 3.4))
        for i, u in enumerate(chosen):
            members = groups[u]
            index = members[np.argmax([(predictions["label"][j] > 0).sum() for j in members])]
            ax = fig.add_subplot(1, len(chosen), i + 1)
            ax.imshow(
                overlay(
                    predictions["preview"][index],
                    predictions["label"][index],
                    predictions["prediction"][index],
                )
            )
            ax.set_title(f"{unit_names[u]}: Dice {unit_dice[u]:.3f}", fontsize=9)
            ax.axis("off")
        files[kind] = _save(fig, out / f"{role}_{kind}.png")
    return files
