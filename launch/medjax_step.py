"""One compiled ``medjax.train`` step on a random batch: what ``benchmark.py`` and ``ab_step.py`` time.

Uses only ``medjax``'s training API (``train.make_steps``, ``optim.make_optimizer``, ...), so it also
times older checkouts of medjax put first on ``sys.path`` (``ab_step.py``).
"""

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from medjax import optim, tasks, train


@dataclasses.dataclass
class TrainStep:
    """A compiled training step and the state and batch it runs on."""

    compiled: Callable
    evaluate: Callable  # The jitted evaluation step, ``evaluate(variables, batch, {})``.
    state: object
    batch: dict
    key: jax.Array
    compile_s: float
    lower: Callable  # ``lower()`` lowers the step again, for the current trace context.

    def run(self) -> None:
        """One step, blocking until it is done; the state advances as in training."""
        self.state, metrics = self.compiled(self.state, self.batch, self.key)
        jax.block_until_ready((self.state, metrics))

    def planned_mb(self) -> dict[str, float]:
        """XLA's planned buffers (arguments, outputs, temporaries, their total), MB."""
        from medjax import memory  # Here: older checkouts that ``ab_step.py`` times have no such module.

        return memory.compiled_mb(self.compiled)

    def gflops(self) -> float:
        """The model's floating-point operations per step, in GFLOP: XLA's cost analysis of this same step
        compiled with XLA's own operations only (``native.xla_only``). XLA's analysis sees no work inside
        medjax's native kernels, so counting the step as it runs would make the count depend on which
        kernels compute it: each operation moved into a native kernel would shrink it."""
        from medjax.evaluate import model_card
        from medjax.models import native

        with native.xla_only():
            return model_card.compiled_gflops(self.lower().compile())


def compile_train_step(
    model, *, optim_cfg, loss_fn, batch_size: int, image_shape, num_classes: int
) -> TrainStep:
    """Compiles ``model``'s training step (``optim_cfg``'s optimizer, ``loss_fn`` from
    ``losses.make_loss_fn``) for a random batch of ``num_classes`` labels.

    With an unfreezing schedule (``optim.unfreeze``) it is the last phase's step: the one that trains
    every layer, and the one that dominates a recipe's time."""
    key = jax.random.key(0)
    variables = train.init_variables(model, rng=key, image_shape=tuple(image_shape))
    tx, _ = optim.make_optimizer(optim_cfg, variables["params"], total_steps=1000, steps_per_epoch=100)
    state = train.create_train_state(tx, variables)
    p_train, p_eval = train.make_steps(model, tx, loss_fn, tasks.get_task("classification"))
    k_img, k_lab = jax.random.split(jax.random.key(1))
    batch = {
        "image": jax.random.normal(k_img, (batch_size, *image_shape), jnp.float32),
        "label": jax.random.randint(k_lab, (batch_size,), 0, num_classes),
    }
    phases = optim_cfg.get("unfreeze")
    phase_arg = {"phase": len(phases) - 1} if phases else {}

    def lower():
        return p_train.lower(state, batch, key, **phase_arg)

    start = time.perf_counter()
    compiled = lower().compile()
    return TrainStep(compiled, p_eval, state, batch, key, time.perf_counter() - start, lower)
