"""Near-duplicate images: a perceptual hash to find candidates, a thumbnail correlation to confirm them.

Pixel hashes (:func:`medjax.data.images.pixel_hash`) only catch exact copies at native resolution. Public
archives also hold re-encoded, resized or re-windowed copies of one image, which leak between splits just
the same. Every image gets a 32x32 grey thumbnail (its *fingerprint*); a 64-bit DCT hash of it
(pHash: the signs of the 8x8 lowest frequencies against their median) proposes pairs within
``max_distance`` bits, and a pair counts as a near-duplicate only if the Pearson correlation of the two
thumbnails reaches ``min_correlation``.

Why both: chest X-rays all look alike at 8x8 frequencies. On the Kermany archive (5,840 images), 10,578
pairs of *different* radiographs lie within 8 bits of each other, and their thumbnail correlation reaches
at most 0.976, while every pixel-identical or re-encoded copy correlates at 1.00 and hashes within
0 bits. The defaults (10 bits, 0.99) therefore find copies that survived JPEG re-encoding, resizing or a
brightness change, and not two patients with similar anatomy. Crops and rotations are not found.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

THUMBNAIL_SIZE = 32
MAX_DISTANCE = 10
MIN_CORRELATION = 0.99


def thumbnail(image: np.ndarray) -> np.ndarray:
    """The (32, 32) uint8 grey fingerprint of a (H, W, 1|3) uint8 image (bilinear, averaging when it
    shrinks)."""
    grey = image[..., 0] if image.shape[-1] == 1 else np.asarray(Image.fromarray(image, "RGB").convert("L"))
    size = (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    return np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR), np.uint8)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``D @ x`` is the DCT of the column vector ``x``."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT = _dct_matrix(THUMBNAIL_SIZE)


def perceptual_hashes(thumbnails: np.ndarray) -> np.ndarray:
    """(N,) uint64 pHashes of (N, 32, 32) thumbnails: bit set where an 8x8 low frequency exceeds the
    median of the 64."""
    coefficients = _DCT[:8] @ thumbnails.astype(np.float64) @ _DCT[:8].T
    flat = coefficients.reshape(len(thumbnails), 64)
    bits = flat > np.median(flat, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


def _standardised(thumbnails: np.ndarray) -> np.ndarray:
    flat = thumbnails.reshape(len(thumbnails), -1).astype(np.float64)
    flat -= flat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.where(norm > 0, norm, 1.0)


def find_pairs(
    thumbnails: np.ndarray, *, max_distance: int = MAX_DISTANCE, min_correlation: float = MIN_CORRELATION
) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, of near-duplicate images among (N, 32, 32) thumbnails.

    All pairs are compared (N^2 / 2 XORs of 64-bit hashes: about 1 s for 17,000 images); a flat image
    (one grey level) correlates with nothing.
    """
    if len(thumbnails) < 2:
        return []
    hashes = perceptual_hashes(thumbnails)
    unit = _standardised(thumbnails)
    pairs = []
    for i in range(len(hashes) - 1):
        near = np.nonzero(np.bitwise_count(hashes[i + 1 :] ^ hashes[i]) <= max_distance)[0] + i + 1
        if len(near):
            correlation = unit[near] @ unit[i]
            pairs += [(i, int(j)) for j in near[correlation >= min_correlation]]
    return pairs
