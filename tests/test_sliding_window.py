"""Sliding-window inference against whole-image inference of translation-equivariant toy models."""

import numpy as np
import pytest
from scipy import ndimage

from medjax.sliding_window import sliding_window_logits, window_starts, window_weights

KERNEL = np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype(np.float32)


def _conv3x3(batch: np.ndarray) -> np.ndarray:
    """A 'SAME' zero-padded 3x3 convolution, 2 -> 4 channels: translation-equivariant, 1-pixel reach."""
    out = np.zeros((*batch.shape[:3], KERNEL.shape[-1]), np.float32)
    for k in range(KERNEL.shape[-1]):
        for c in range(KERNEL.shape[-2]):
            out[..., k] += ndimage.correlate(batch[..., c], KERNEL[None, :, :, c, k], mode="constant")
    return out


class Recorder:
    """Wraps a model function and records the batch shapes it is called with."""

    def __init__(self, fn):
        self.fn, self.shapes = fn, set()

    def __call__(self, batch):
        self.shapes.add(batch.shape)
        return self.fn(batch)


def test_window_starts_cover_the_axis_with_the_last_window_flush():
    assert window_starts(64, 32, 0.5) == [0, 16, 32]
    assert window_starts(70, 32, 0.5) == [0, 13, 25, 38]  # step (70 - 32) / 3 = 12.67 <= 16
    assert window_starts(32, 32, 0.5) == [0]
    assert window_starts(33, 32, 0.0) == [0, 1]
    with pytest.raises(ValueError, match="shorter than the window"):
        window_starts(20, 32, 0.5)


def test_gaussian_weights_peak_at_the_centre_and_stay_positive():
    w = window_weights((32, 16))
    assert w.shape == (32, 16) and w.max() == pytest.approx(1.0) and w.min() > 0
    np.testing.assert_allclose(w, w[::-1, ::-1], rtol=1e-6)  # symmetric
    # sigma = 0.125 * 32 = 4 along rows: half a pixel off centre, then 4 pixels further, exp(-0.5) lower.
    assert w[19, 7] / w[15, 7] == pytest.approx(np.exp(-0.5 * ((3.5 / 4) ** 2 - (0.5 / 4) ** 2)), rel=1e-5)
    np.testing.assert_array_equal(window_weights((4, 4), blend="constant"), np.ones((4, 4)))


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("size", [(70, 45), (20, 50), (32, 32)])
def test_pointwise_model_equals_whole_image_everywhere(blend, size):
    weight = np.array([[1.0, -2.0, 0.5], [0.3, 0.0, 1.0]], np.float32)
    image = np.random.default_rng(1).normal(size=(*size, 2)).astype(np.float32)
    model = Recorder(lambda batch: batch @ weight)
    got = sliding_window_logits(model, image, window=(32, 32), overlap=0.5, batch_size=3, blend=blend)
    assert got.shape == (*size, 3)
    np.testing.assert_allclose(got, image @ weight, rtol=1e-5, atol=1e-5)
    assert model.shapes == {(3, 32, 32, 2)}  # one shape: a jitted apply_fn compiles once


def test_convolution_equals_whole_image_wherever_every_window_saw_the_neighbourhood():
    image = np.random.default_rng(2).normal(size=(70, 45, 2)).astype(np.float32)
    got = sliding_window_logits(_conv3x3, image, window=(32, 32), overlap=0.5, batch_size=4)
    expected = _conv3x3(image[None])[0]
    # A pixel is exact when, in every window covering it, its 3x3 neighbourhood is inside the window or
    # outside the image (where both inferences see the same zero padding).
    exact = np.ones(image.shape[:2], bool)
    for y in window_starts(70, 32, 0.5):
        for x in window_starts(45, 32, 0.5):
            inner = np.zeros_like(exact)
            inner[y + (y > 0) : y + 32 - (y + 32 < 70), x + (x > 0) : x + 32 - (x + 32 < 45)] = True
            covered = np.zeros_like(exact)
            covered[y : y + 32, x : x + 32] = True
            exact &= ~covered | inner
    assert exact.mean() > 0.8
    np.testing.assert_allclose(got[exact], expected[exact], rtol=1e-4, atol=1e-4)
    assert np.abs(got[~exact] - expected[~exact]).max() > 1e-3  # the test can tell windows apart


def test_image_smaller_than_the_window_is_padded_and_cropped():
    image = np.random.default_rng(3).normal(size=(20, 24, 2)).astype(np.float32)
    got = sliding_window_logits(_conv3x3, image, window=(32, 32), batch_size=2)
    # Zero padding at the bottom/right is what whole-image 'SAME' convolution sees there too.
    np.testing.assert_allclose(got, _conv3x3(image[None])[0], rtol=1e-4, atol=1e-4)


def test_bad_arguments_are_clear_errors():
    image = np.zeros((32, 32, 1), np.float32)
    with pytest.raises(ValueError, match="overlap must be in"):
        sliding_window_logits(lambda b: b, image, window=(32, 32), overlap=1.0)
    with pytest.raises(ValueError, match=r"image must be \(H, W, C\)"):
        sliding_window_logits(lambda b: b, image[None], window=(32, 32))
    with pytest.raises(ValueError, match="blend must be one of"):
        sliding_window_logits(lambda b: b, image, window=(32, 32), blend="linear")
