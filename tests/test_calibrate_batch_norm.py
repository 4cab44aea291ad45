"""BatchNorm calibration (:mod:`medjax.models.convert.calibrate`) on a two-layer network built like
MobileNetV2 (``nn.BatchNorm`` in evaluation, medjax's ``layers.BatchNorm`` in training, one of them in a
submodule): evaluation unchanged, the training pass equal to it on the calibration images, and the stored
statistics those of the BatchNorm inputs computed by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medjax import init_from
from medjax.models import layers
from medjax.models.convert.calibrate import calibrate_batch_norm
from tests.conftest import smoke_config

EPSILON = 1e-3


def _bn(train: bool, name: str) -> nn.Module:
    return (layers.BatchNorm if train else nn.BatchNorm)(
        use_running_average=not train, epsilon=EPSILON, name=name
    )


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        return _bn(train, "bn")(nn.Conv(4, (1, 1), name="conv")(x))


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        x = jax.nn.relu6(_bn(train, "bn0")(nn.Conv(8, (3, 3), name="conv0")(x)))
        return Block(name="block")(x, train=train), {}


def _randomised(variables: dict, rng: np.random.Generator) -> dict:
    """BatchNorms with random scale, bias and statistics (a pretrained start, not the identity)."""
    flat = traverse_util.flatten_dict(variables)
    for path, value in flat.items():
        if path[-2].startswith("bn"):
            random = (
                rng.uniform(0.5, 2.0, value.shape)
                if path[-1] in ("scale", "var")
                else rng.normal(size=value.shape)
            )
            flat[path] = jnp.asarray(random, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def test_calibration_keeps_evaluation_and_makes_training_agree():
    model = Tiny()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(6, 8, 8, 3)) * 2 + 1, jnp.float32)
    variables = _randomised(jax.jit(lambda: model.init(jax.random.key(0), images, train=False))(), rng)

    evaluate = jax.jit(lambda v: model.apply(v, images, train=False)[0])
    train_pass = jax.jit(lambda v: model.apply(v, images, train=True, mutable=["batch_stats"])[0][0])

    before = evaluate(variables)
    assert np.abs(train_pass(variables) - before).max() > 0.1  # the mismatch calibration removes
    calibrated = calibrate_batch_norm(model, variables, [images[:3], images[3:]])
    np.testing.assert_allclose(evaluate(calibrated), before, atol=1e-5)
    np.testing.assert_allclose(train_pass(calibrated), before, atol=1e-5)

    conv0 = nn.Conv(8, (3, 3)).apply({"params": variables["params"]["conv0"]}, images)
    stats = calibrated["batch_stats"]["bn0"]
    np.testing.assert_allclose(stats["mean"], conv0.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], conv0.var((0, 1, 2)), rtol=1e-4)
    assert set(calibrated["batch_stats"]) == {"bn0", "block"}
    assert not np.allclose(
        calibrated["batch_stats"]["block"]["bn"]["mean"], variables["batch_stats"]["block"]["bn"]["mean"]
    )


def test_calibration_images_are_the_first_training_images(tfds_data_dir):
    """``init_from.calibrate_images`` reads whole evaluation batches of the training split, no padding."""
    config = smoke_config(tfds_data_dir)
    config.data.eval_batch_size = 4
    batches = list(init_from.first_images(config.data, 6))
    assert [b.shape for b in batches] == [(4, 32, 32, 1)] * 2
    from medjax.data import pipeline

    first = next(pipeline.iterate_eval(config.data, split="train", batch_size=4))["image"]
    np.testing.assert_array_equal(batches[0], first)
