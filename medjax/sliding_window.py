"""Sliding-window inference with overlap blending, for images larger than (or not shaped like) the
training patches.

A segmentation model trained on random ``window``-sized crops is evaluated on whole images by tiling them
with overlapping windows, predicting each window, and averaging the overlapping logits with a weight per
window pixel (nnU-Net's and MONAI's ``sliding_window_inference``):

- Window starts along an axis are spread evenly from 0 to ``L - w`` with a step of at most
  ``w * (1 - overlap)`` (nnU-Net's rule), so the last window is flush with the image edge and no padding
  is needed for sides that are not multiples of the window. A side shorter than the window is padded
  (``pad_value``, bottom/right) up to it, and the padding is cropped from the result.
- ``blend='gaussian'`` weighs each window's pixels by a Gaussian centred on the window with
  ``sigma = sigma_scale * window`` (0.125 as both nnU-Net and MONAI), normalised to 1 at the centre and
  floored at its smallest positive value: window borders, where the model saw the least context, count
  least. ``blend='constant'`` is the plain average.
- Logits are blended (nnU-Net v2 aggregates logits too), not probabilities: a softmax afterwards gives the
  probabilities.
- Evaluation during training and ``python -m medjax.evaluate`` use :class:`SlidingWindow`
  (``config.eval.window``, :func:`wrap`): the same positions and weights, blended inside the jitted
  evaluation step for a whole batch.
- Windows go to the model in batches of exactly ``batch_size`` (the last one padded with repeats), so a
  jitted ``apply_fn`` compiles once for every image size.
"""

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BLENDS = ("gaussian", "constant")


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """First index of each window along an axis of ``length >= window`` (nnU-Net's even spacing).

    ``n = ceil((length - window) / step) + 1`` windows with ``step = window * (1 - overlap)`` (at least
    1 pixel), placed at ``round(i * (length - window) / (n - 1))``: the first at 0, the last flush with
    the end, neighbours overlapping by at least ``overlap``.
    """
    if length < window:
        raise ValueError(f"length {length} is shorter than the window {window}; pad first")
    step = max(1.0, window * (1.0 - overlap))
    count = math.ceil((length - window) / step) + 1
    if count == 1:
        return [0]
    spacing = (length - window) / (count - 1)
    return [round(i * spacing) for i in range(count)]


def window_weights(
    window: tuple[int, int], *, blend: str = "gaussian", sigma_scale: float = 0.125
) -> np.ndarray:
    """``(h, w)`` blending weights of one window's pixels, 1 at the centre; see the module docstring."""
    if blend == "constant":
        return np.ones(window, np.float32)
    if blend != "gaussian":
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    axes = [(np.arange(n) - (n - 1) / 2) / (sigma_scale * n) for n in window]
    weights = np.exp(-0.5 * (axes[0][:, None] ** 2 + axes[1][None, :] ** 2))
    weights /= weights.max()
    return np.maximum(weights, weights[weights > 0].min()).astype(np.float32)


def sliding_window_logits(
    apply_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    *,
    window: tuple[int, int],
    overlap: float = 0.5,
    batch_size: int = 4,
    blend: str = "gaussian",
    sigma_scale: float = 0.125,
    pad_value: float = 0.0,
) -> np.ndarray:
    """Blended per-pixel logits of a whole image from overlapping windows.

    Args:
      apply_fn: ``(batch_size, h, w, C)`` windows to ``(batch_size, h, w, K)`` logits, e.g. a jitted
        ``lambda x: model.apply(variables, x, train=False)[0]``.
      image: ``(H, W, C)``, any size.
      window: ``(h, w)``, the model's input size (the training patch size; multiples of 32 need no
        padding inside the models).
      overlap: fraction in ``[0, 1)`` by which neighbouring windows overlap at least (0.5: nnU-Net's and
        a common MONAI setting).
      batch_size: windows per ``apply_fn`` call.
      blend: 'gaussian' or 'constant' weights.
      sigma_scale: Gaussian sigma as a fraction of the window side.
      pad_value: fills a side shorter than the window (bottom/right) before tiling.

    Returns:
      ``(H, W, K)`` float32 logits.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got shape {image.shape}")
    height, width = image.shape[:2]
    wh, ww = window
    padded = np.pad(
        image,
        ((0, max(0, wh - height)), (0, max(0, ww - width)), (0, 0)),
        constant_values=pad_value,
    )
    corners = [
        (y, x)
        for y in window_starts(padded.shape[0], wh, overlap)
        for x in window_starts(padded.shape[1], ww, overlap)
    ]
    weights = window_weights(window, blend=blend, sigma_scale=sigma_scale)[..., None]
    total, norm = None, np.zeros((*padded.shape[:2], 1), np.float32)
    for first in range(0, len(corners), batch_size):
        chunk = corners[first : first + batch_size]
        windows = np.stack([padded[y : y + wh, x : x + ww] for y, x in chunk])
        if len(chunk) < batch_size:  # repeat the last window so every call has the same shape
            windows = np.concatenate([windows, np.repeat(windows[-1:], batch_size - len(chunk), axis=0)])
        logits = np.asarray(apply_fn(windows), np.float32)
        if total is None:
            total = np.zeros((*padded.shape[:2], logits.shape[-1]), np.float32)
        for (y, x), window_logits in zip(chunk, logits, strict=False):
            total[y : y + wh, x : x + ww] += window_logits * weights
            norm[y : y + wh, x : x + ww] += weights
    return (total / norm)[:height, :width]


def apply_windows(apply_fn, images: jax.Array, window: tuple[int, int], overlap: float) -> jax.Array:
    """``(B, H, W, K)`` Gaussian-blended logits of ``apply_fn`` (``(B, h, w, C) -> (B, h, w, K)``) over
    the windows of a batch, inside a jitted program (window positions depend only on the static shape;
    a side shorter than the window is taken whole). :func:`sliding_window_logits` is the host version
    for one image of any size."""
    h, w = images.shape[1:3]
    wh, ww = min(window[0], h), min(window[1], w)
    weights = jnp.asarray(window_weights((wh, ww)))[None, :, :, None]
    total = norm = None
    for top in window_starts(h, wh, overlap):
        for left in window_starts(w, ww, overlap):
            logits = apply_fn(images[:, top : top + wh, left : left + ww])
            if total is None:
                total = jnp.zeros((*images.shape[:3], logits.shape[-1]), logits.dtype)
                norm = jnp.zeros((1, h, w, 1), jnp.float32)
            total = total.at[:, top : top + wh, left : left + ww].add(logits * weights)
            norm = norm.at[:, top : top + wh, left : left + ww].add(weights)
    return total / norm


@dataclasses.dataclass(frozen=True)
class SlidingWindow:
    """A model whose inference-mode ``apply`` on images larger than ``window`` goes window by window
    (``aux`` is then empty); training and ``init`` are the wrapped model's. Same variables."""

    model: nn.Module
    window: tuple[int, int]
    overlap: float = 0.5

    def init(self, *args, **kwargs):
        return self.model.init(*args, **kwargs)

    def apply(self, variables, images, *, train: bool, **kwargs):
        h, w = images.shape[1:3]
        if train or (h <= self.window[0] and w <= self.window[1]):
            return self.model.apply(variables, images, train=train, **kwargs)
        logits = apply_windows(
            lambda x: self.model.apply(variables, x, train=False, **kwargs)[0],
            images,
            self.window,
            self.overlap,
        )
        return logits, {}


def wrap(model: nn.Module, config) -> nn.Module | SlidingWindow:
    """``model`` itself, or windowed when ``config.eval.window`` is set (segmentation configs)."""
    window = config.eval.get("window")
    if not window:
        return model
    size = (int(window), int(window)) if isinstance(window, int | float) else (int(window[0]), int(window[1]))
    overlap = float(config.eval.window_overlap)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"eval.window_overlap={overlap} must be in [0, 1).")
    return SlidingWindow(model, size, overlap)
