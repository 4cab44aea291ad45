"""Schedules, optimizers and selective unfreezing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import optim
from tests.conftest import optim_config

PARAMS = {
    "stem": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.ones((4,))},
    "block_0": {"kernel": jnp.ones((4, 4))},
    "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros((2,))},
}


def test_warmup_then_cosine_schedule_values():
    cfg = optim_config(learning_rate=1.0, warmup_epochs=1.0, schedule="cosine", min_lr_ratio=0.1)
    sched = optim.make_schedule(cfg, total_steps=30, steps_per_epoch=10)
    assert float(sched(0)) == pytest.approx(0.0)
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    # Halfway through the 20 decay steps: 0.1 + 0.9 * (1 + cos(pi / 2)) / 2 = 0.55.
    assert float(sched(20)) == pytest.approx(0.55, rel=1e-5)
    assert float(sched(30)) == pytest.approx(0.1, rel=1e-5)


def test_adamw_does_not_decay_vectors():
    cfg = optim_config(name="adamw", learning_rate=0.1, weight_decay=0.5, schedule="constant")
    tx, _ = optim.make_optimizer(cfg, PARAMS, total_steps=10, steps_per_epoch=10)
    zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zero_grads, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["stem"]["bias"], 0.0)
    np.testing.assert_allclose(updates["stem"]["kernel"], -0.1 * 0.5)


def test_frozen_parameters_stay_bit_identical():
    cfg = optim_config(name="adam", learning_rate=0.1, schedule="constant", trainable=("head/.*",))
    tx, _ = optim.make_optimizer(cfg, PARAMS, total_steps=10, steps_per_epoch=10)
    state, params = tx.init(PARAMS), PARAMS
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["stem"]["kernel"], PARAMS["stem"]["kernel"])
    np.testing.assert_array_equal(params["block_0"]["kernel"], PARAMS["block_0"]["kernel"])
    assert not np.allclose(params["head"]["kernel"], PARAMS["head"]["kernel"])


def test_trainable_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"match no parameter: \['hed/\.\*'\]"):
        optim.trainable_mask(PARAMS, ["hed/.*"])


def test_unknown_optimizer_and_schedule():
    with pytest.raises(ValueError, match="optim.name"):
        optim.make_optimizer(optim_config(name="lamb"), PARAMS, total_steps=2, steps_per_epoch=1)
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.make_schedule(optim_config(schedule="step"), total_steps=2, steps_per_epoch=1)
