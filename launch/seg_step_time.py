"""Training-step time of the segmentation models at a small resolution on CPU.

Times the jitted ``medjax.train_step`` step (AdamW, cross-entropy + Dice, BatchNorm statistics updated) on a
random batch: median seconds per step after warm-up, plus compile time and parameter count. The
classification task's step metrics are used (pixel accuracy is what they compute on label maps), since
only the step's cost is measured. Example (a few minutes on 2 cores)::

    JAX_PLATFORMS=cpu python launch/seg_step_time.py --size 64 --batch 8 --steps 10
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from timing import timed

from medjax import losses, train_step
from medjax.evaluate.model_card import count_params
from medjax.models import get_model
from medjax.tasks import get_task

MODELS = ("unet", "mednext_plos_seg")


def measure(
    name: str, *, size: int, batch: int, channels: int, classes: int, steps: int, warmup: int
) -> dict:
    model = get_model(name, num_classes=classes)
    variables = train_step.init_variables(model, rng=jax.random.key(0), image_shape=(size, size, channels))
    tx = optax.adamw(1e-3, weight_decay=0.05)
    loss_fn = losses.make_loss_fn({"cross_entropy": {"weight": 1.0}, "dice": {"weight": 1.0}})
    step, _ = train_step.make_steps(model, tx, loss_fn, get_task("classification"))
    state = train_step.create_train_state(tx, variables)
    keys = jax.random.split(jax.random.key(1), 2)
    batch = {
        "image": jax.random.normal(keys[0], (batch, size, size, channels)),
        "label": jax.random.randint(keys[1], (batch, size, size), 0, classes),
    }
    seed = jax.random.key(2)

    def run():
        nonlocal state
        state, metrics = step(state, batch, seed)
        jax.block_until_ready(metrics)

    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    times = timed(run, steps=steps, warmup=warmup)
    return {
        "model": name,
        "params": count_params(variables["params"]),
        "compile_s": round(compile_s, 1),
        "step_s": round(statistics.median(times), 3),
        "images_per_s": round(batch["image"].shape[0] / statistics.median(times), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    settings = {k: v for k, v in vars(args).items() if k != "models"}
    for name in args.models:
        print(measure(name, **settings), flush=True)


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
