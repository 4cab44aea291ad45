"""Selective unfreezing as a schedule: frozen parameters and statistics hold still until their phase,
unfrozen groups start Adam afresh, the step compiles once per phase without the backward pass of what
the phase freezes (and updates as the full backward pass would), and a run resumes mid-schedule
exactly."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import checkpointing, losses, models, optim, train, train_step, unfreeze
from medjax.errors import ConfigError
from medjax.run_dir import RunDir
from medjax.tasks import classification
from tests.conftest import optim_config, smoke_config
from tests.test_train_step import TinyNet

SCHEDULE = ({"epoch": 0, "trainable": ("classifier/.*",)}, {"epoch": 1, "trainable": None})
LR = 0.01


def _batch(rng):
    return {"image": rng.normal(2.0, 1.0, (4, 8, 8, 1)).astype(np.float32), "label": np.array([0, 1, 0, 1])}


def test_frozen_until_its_phase_then_trains_with_fresh_adam_in_one_compilation():
    model = TinyNet()
    variables = train_step.init_variables(model, rng=jax.random.key(0), image_shape=(8, 8, 1))
    cfg = optim_config(name="adam", learning_rate=LR, schedule="constant", unfreeze=SCHEDULE)
    tx, _ = optim.make_optimizer(cfg, variables["params"], total_steps=4, steps_per_epoch=2)
    tables = optim.trainable_tables(variables["params"], unfreeze.parse(SCHEDULE))
    frozen_stats = optim.frozen_statistics_tables(tables, variables["batch_stats"])
    assert frozen_stats["stem_bn"]["mean"].tolist() == [True, False]
    state = train_step.create_train_state(tx, variables)
    step = jax.jit(
        chex.assert_max_traces(
            lambda s, b, p: train_step.train_step(
                s,
                b,
                jax.random.key(1),
                p,
                model=model,
                tx=tx,
                loss_fn=losses.make_loss_fn({"cross_entropy": {"weight": 1.0}}),
                task=classification,
                frozen_stats=frozen_stats,
            ),
            n=1,
        )
    )
    rng = np.random.default_rng(0)
    for _ in range(2):  # Phase 0: the classifier only.
        state, _ = step(state, _batch(rng), jnp.asarray(0, jnp.int32))
    for name in ("stem", "body", "stem_bn", "body_bn"):
        chex.assert_trees_all_equal(state.params[name], variables["params"][name])
    chex.assert_trees_all_equal(state.batch_stats, variables["batch_stats"])
    assert not np.allclose(state.params["classifier"]["kernel"], variables["params"]["classifier"]["kernel"])
    # The frozen groups' optimizer state did not move: zero moments, no Adam steps counted.
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=_is_adam) if _is_adam(s)]
    assert sorted(int(s.count) for s in adam) == [0, 2]  # The classifier's group stepped twice.
    body_adam = next(s for s in adam if int(s.count) == 0)
    assert all(not np.any(m) for m in jax.tree.leaves((body_adam.mu, body_adam.nu)))

    before = state.params["stem"]["kernel"]
    state, _ = step(state, _batch(rng), jnp.asarray(1, jnp.int32))
    # Adam's first step for a freshly unfrozen group: each element moves by lr (g / |g|), not by the
    # 3x lr that a bias correction counted from step 0 would give.
    np.testing.assert_allclose(np.abs(state.params["stem"]["kernel"] - before), LR, rtol=1e-3)
    assert not np.allclose(state.batch_stats["stem_bn"]["mean"], variables["batch_stats"]["stem_bn"]["mean"])


def test_frozen_parameters_skip_the_backward_pass_with_the_same_updates(monkeypatch):
    """The schedule's step as the loop runs it (phase static, frozen parameters behind stop_gradient)
    against the full backward pass with masked updates (phase traced), on a tiny MobileNetV2: the same
    state bit for bit after 2 head-only steps, and to float32 rounding after 2 more steps of the second
    phase (which trains the layers from block_16 up, so the backward pass stops inside the network).
    Rounding, not bits, there: XLA compiles the two programs' shared arithmetic differently (measured:
    the batch-statistic means of the same forward pass and 3 kernels differ by 1-2 ulp, 3e-8).

    Both with XLA's matrix products (``MEDJAX_MKL=0``): oneMKL's run only under differentiation, so the
    frozen layers' forward pass would be XLA's in one program and oneMKL's in the other, and BatchNorm
    over this tiny batch's 1x1 head map turns their different roundings into different updates."""
    monkeypatch.setenv("MEDJAX_MKL", "0")
    model = models.get_model("mobilenet_v2", num_classes=2, width_multiplier=0.35)
    variables = train_step.init_variables(model, rng=jax.random.key(0), image_shape=(16, 16, 3))
    schedule = (
        {"epoch": 0, "trainable": ("classifier/.*",)},
        {"epoch": 1, "trainable": ("block_16/.*", "head_.*", "classifier/.*")},
    )
    cfg = optim_config(name="adamw", learning_rate=LR, schedule="constant", unfreeze=schedule)
    tx, _ = optim.make_optimizer(cfg, variables["params"], total_steps=4, steps_per_epoch=2)
    trainable = optim.trainable_tables(variables["params"], unfreeze.parse(schedule))
    frozen_stats = optim.frozen_statistics_tables(trainable, variables["batch_stats"])
    loss_fn = losses.make_loss_fn({"cross_entropy": {"weight": 1.0}})
    pruned, _ = train_step.make_steps(
        model, tx, loss_fn, classification, frozen_stats=frozen_stats, trainable=trainable
    )
    full = jax.jit(
        functools.partial(
            train_step.train_step,
            model=model,
            tx=tx,
            loss_fn=loss_fn,
            task=classification,
            frozen_stats=frozen_stats,
        )
    )
    rng = np.random.default_rng(0)
    a = train_step.create_train_state(tx, variables)
    b = jax.tree.map(jnp.copy, a)  # The pruned step donates its state.
    for i in range(4):
        batch = {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32), "label": np.array([0, 1, 0, 1])}
        a, _ = full(a, batch, jax.random.key(1), jnp.asarray(i // 2, jnp.int32))
        b, _ = pruned(b, batch, jax.random.key(1), phase=i // 2)
        if i == 1:
            chex.assert_trees_all_equal(a, b)  # Parameters, statistics and optimizer state, exactly.
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7)
    block_16 = variables["params"]["block_16"]["project"]["kernel"]
    assert not np.array_equal(a.params["block_16"]["project"]["kernel"], block_16)  # It trained.


def _is_adam(x):
    return isinstance(x, optax.ScaleByAdamState)


def test_one_phase_of_everything_is_plain_adam():
    params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    grads = {"w": jnp.asarray([1.0, -2.0, 3.0, 0.5]), "b": jnp.asarray([0.1, -0.1])}
    cfg = optim_config(name="adamw", learning_rate=0.1, schedule="constant", weight_decay=0.1)
    decay_kernels = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    plain = optax.adamw(optax.constant_schedule(0.1), weight_decay=0.1, mask=decay_kernels)
    phased_cfg = optim_config(**{**cfg.to_dict(), "unfreeze": ({"epoch": 0, "trainable": None},)})
    phased, _ = optim.make_optimizer(phased_cfg, params, total_steps=3, steps_per_epoch=3)
    ours, _ = optim.make_optimizer(cfg, params, total_steps=3, steps_per_epoch=3)
    # Without a schedule the optimizer state keeps optax's layout, so older checkpoints still restore.
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(plain.init(params))
    s1, s2 = plain.init(params), phased.init(params)
    for _ in range(3):
        u1, s1 = plain.update(grads, s1, params)
        u2, s2 = phased.update(grads, s2, params, phase=jnp.asarray(0))
        chex.assert_trees_all_close(u1, u2, rtol=1e-6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"epoch": 0, "trainable": None}, "non-empty sequence"),
        (({"epoch": 1, "trainable": None},), "must start at epoch 0"),
        (({"epoch": 0, "trainable": None}, {"epoch": 0, "trainable": None}), "not after the previous"),
        (({"epoch": 0, "trainable": None}, {"plateau": 0, "trainable": None}), "positive number"),
        (({"epoch": 0, "trainable": None, "plateau": 2},), "exactly one of"),
        (({"epoch": 0},), "has keys"),
        (({"epoch": 0, "trainable": "head/.*"},), "not a string"),
    ],
)
def test_invalid_schedules_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        unfreeze.parse(spec)


def test_schedule_and_static_trainable_are_exclusive_and_patterns_must_match():
    params = {"head": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ConfigError, match="both set"):
        optim.make_optimizer(
            optim_config(name="adam", learning_rate=1.0, trainable=("head/.*",), unfreeze=SCHEDULE),
            params,
            total_steps=2,
            steps_per_epoch=1,
        )
    with pytest.raises(ValueError, match=r"match no parameter: \['classifier/\.\*'\]"):
        optim.trainable_tables(params, unfreeze.parse(SCHEDULE))


def test_tracker_advances_by_epoch_and_by_plateau_and_resumes():
    phases = unfreeze.parse(
        (
            {"epoch": 0, "trainable": ("a",)},
            {"epoch": 1.5, "trainable": ("b",)},
            {"plateau": 2, "trainable": None},
        )
    )
    tracker = unfreeze.PhaseTracker(phases, steps_per_epoch=10, monitor="loss", min_delta=0.0)
    assert not tracker.at_step(14) and tracker.phase == 0
    assert tracker.at_step(15) and tracker.phase == 1
    assert not tracker.after_evaluation(1.0)  # An improvement.
    assert not tracker.after_evaluation(1.0)  # One evaluation without.
    resumed = unfreeze.PhaseTracker(
        phases, steps_per_epoch=10, monitor="loss", min_delta=0.0, state=tracker.state()
    )
    assert resumed.phase == 1 and resumed.after_evaluation(1.5) and resumed.phase == 2
    assert not resumed.at_step(1000)  # The last phase lasts.


class _Interrupted(Exception):
    pass


def test_run_interrupted_mid_schedule_resumes_in_its_phase(tmp_path, tfds_data_dir, monkeypatch):
    """Two phase switches over 4 steps (eval and checkpoint after each), killed after step 2: the resumed
    run takes steps 3 and 4 in phases 1 and 2, and each run traces its train step once per phase."""
    traced, original_step = [], train_step.train_step

    def recording_step(*args, phase=None, **kwargs):
        traced.append(phase)  # Runs at tracing only: the jitted step calls the compiled program.
        return original_step(*args, phase=phase, **kwargs)

    monkeypatch.setattr(train_step, "train_step", recording_step)
    config = smoke_config(tfds_data_dir, num_epochs=4 / 8, eval_every_epochs=1 / 8, log_every_steps=1)
    config.optim.unfreeze = (
        {"epoch": 0, "trainable": ("classifier/.*",)},
        {"epoch": 2 / 8, "trainable": ("block_16/.*", "head_.*", "classifier/.*")},
        {"epoch": 3 / 8, "trainable": None},
    )
    original_save = checkpointing.RunCheckpointer.save

    def save_then_die(self, step, **kwargs):
        original_save(self, step, **kwargs)
        if step == 2:
            raise _Interrupted

    monkeypatch.setattr(checkpointing.RunCheckpointer, "save", save_then_die)
    with pytest.raises(_Interrupted):
        train.train_and_evaluate(config, tmp_path)
    monkeypatch.setattr(checkpointing.RunCheckpointer, "save", original_save)
    assert traced == [0]
    report = train.train_and_evaluate(config, tmp_path)
    assert report["steps"] == 4 and traced == [0, 1, 2]
    rows = [json.loads(line) for line in RunDir(tmp_path).metrics_file.read_text().splitlines()]
    assert [(r["step"], r["unfreeze_phase"]) for r in rows if r["kind"] == "train"] == [
        (1, 0),
        (2, 0),
        (3, 1),
        (4, 2),
    ]
