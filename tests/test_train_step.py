"""The train step on a tiny model: selective unfreezing leaves frozen weights and statistics untouched;
the weight average follows its warmed-up decay."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax import losses, optim, train_step
from medjax.tasks import classification
from tests.conftest import optim_config


class TinyNet(nn.Module):
    num_classes: int = 2

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Conv(4, (3, 3), use_bias=False, name="stem")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x)
        x = nn.Conv(4, (3, 3), use_bias=False, name="body")(nn.relu(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="body_bn")(x)
        features = jnp.mean(nn.relu(x), axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(features), {"features": features}


def test_frozen_parameters_and_their_batchnorm_statistics_do_not_change():
    model = TinyNet()
    optim_cfg = optim_config(
        name="adam", learning_rate=0.1, schedule="constant", trainable=("body.*", "classifier/.*")
    )
    variables = train_step.init_variables(model, rng=jax.random.key(0), image_shape=(8, 8, 1))
    tx, _ = optim.make_optimizer(optim_cfg, variables["params"], total_steps=3, steps_per_epoch=3)
    trainable = optim.trainable_mask(variables["params"], optim_cfg["trainable"])
    frozen_stats = optim.frozen_statistics_mask(trainable, variables["batch_stats"])
    assert frozen_stats == {"stem_bn": {"mean": True, "var": True}, "body_bn": {"mean": False, "var": False}}

    state = train_step.TrainState(
        step=jnp.asarray(0),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )
    step = jax.jit(
        lambda s, b, k: train_step.train_step(
            s,
            b,
            k,
            model=model,
            tx=tx,
            loss_fn=losses.make_loss_fn({"cross_entropy": {"weight": 1.0}}),
            task=classification,
            frozen_stats=frozen_stats,
        )
    )
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = {
            "image": rng.normal(2.0, 1.0, (4, 8, 8, 1)).astype(np.float32),
            "label": np.array([0, 1, 0, 1]),
        }
        state, metrics = step(state, batch, jax.random.key(1))
    assert int(state.step) == 3 and np.isfinite(metrics["loss"])
    for name in ("stem", "stem_bn"):
        jax.tree.map(np.testing.assert_array_equal, state.params[name], variables["params"][name])
    jax.tree.map(
        np.testing.assert_array_equal, state.batch_stats["stem_bn"], variables["batch_stats"]["stem_bn"]
    )
    assert not np.allclose(state.params["body"]["kernel"], variables["params"]["body"]["kernel"])
    assert not np.allclose(state.batch_stats["body_bn"]["mean"], variables["batch_stats"]["body_bn"]["mean"])


def test_weight_average_follows_the_warmed_up_decay():
    model = TinyNet()
    variables = train_step.init_variables(model, rng=jax.random.key(0), image_shape=(8, 8, 1))
    optim_cfg = optim_config(name="adam", learning_rate=0.1, schedule="constant")
    tx, _ = optim.make_optimizer(optim_cfg, variables["params"], total_steps=3, steps_per_epoch=3)
    state = train_step.create_train_state(tx, variables, with_ema=True)
    loss_fn = losses.make_loss_fn({"cross_entropy": {"weight": 1.0}})
    step = jax.jit(
        lambda s, b: train_step.train_step(
            s, b, jax.random.key(1), model=model, tx=tx, loss_fn=loss_fn, task=classification, ema_decay=0.9
        )
    )
    expected = jax.tree.map(np.asarray, variables)
    rng = np.random.default_rng(0)
    for decay in [1 / 10, 2 / 11, 3 / 12]:  # min(0.9, (1 + t) / (10 + t)) at steps t = 0, 1, 2.
        batch = {"image": rng.normal(size=(4, 8, 8, 1)).astype(np.float32), "label": np.array([0, 1, 0, 1])}
        state, _ = step(state, batch)
        expected = jax.tree.map(
            lambda e, v, d=decay: d * e + (1 - d) * np.asarray(v), expected, state.variables
        )
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.ema, expected)
    assert state.eval_variables is state.ema
    assert not np.allclose(state.ema["params"]["body"]["kernel"], state.params["body"]["kernel"])
    assert train_step.create_train_state(tx, variables).eval_variables["params"] is variables["params"]
