"""Sliding-window inference: a segmentation model evaluated on windows of a large image, blended.

Windows of ``window`` (H, W) pixels step by ``window * (1 - overlap)`` and cover the image, the last one
of a row or column flush with the border (as MONAI's ``sliding_window_inference``); each window's logits
are weighted by a Gaussian centred on the window (sigma = 1/8 of its side, MONAI's ``mode='gaussian'``,
so the less reliable window borders count little) and the weighted sum is divided by the summed weights.
Window positions depend only on the (static) image shape, so the whole pass is one jitted program.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def starts(size: int, window: int, overlap: float) -> list[int]:
    """Window offsets along one axis: step ``window * (1 - overlap)`` (at least 1), last window flush."""
    if size <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    count = math.ceil((size - window) / step) + 1
    return sorted({min(i * step, size - window) for i in range(count)})


def gaussian_weights(window: tuple[int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """``(h, w)`` importance map, 1 at the centre, never below 1e-3 (every pixel keeps a weight)."""
    axes = []
    for n in window:
        x = np.arange(n) - (n - 1) / 2
        axes.append(np.exp(-0.5 * (x / (sigma_scale * n)) ** 2))
    weights = np.outer(*axes)
    return np.maximum(weights / weights.max(), 1e-3).astype(np.float32)


def apply_windows(apply_fn, images: jax.Array, window: tuple[int, int], overlap: float) -> jax.Array:
    """``(B, H, W, K)`` blended logits of ``apply_fn`` (``(B, h, w, C) -> (B, h, w, K)``) over windows."""
    h, w = images.shape[1:3]
    wh, ww = min(window[0], h), min(window[1], w)
    weights = jnp.asarray(gaussian_weights((wh, ww)))[None, :, :, None]
    total = norm = None
    for top in starts(h, wh, overlap):
        for left in starts(w, ww, overlap):
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
