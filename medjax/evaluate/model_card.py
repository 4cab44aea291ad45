"""The model card of a trained run: size, compute, latency, training data, recipe and training summary.

The profile functions are shared by ``python -m medjax.evaluate`` and ``launch/benchmark.py``.
FLOPs come from XLA's cost analysis of the compiled function, which counts a multiply-add as two FLOPs;
papers that quote "GFLOPs" for MobileNetV2 (0.30) or ConvNeXt-Tiny (4.5) usually count multiply-adds,
so XLA's figure is about twice theirs for the same network.
"""

import statistics
import timeit
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from medjax import run_dir


def count_params(tree) -> int:
    """Number of scalars in a pytree (pass ``variables['params']`` for the trainable parameters)."""
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def size_mb(tree) -> float:
    """Bytes of a pytree's arrays in MB (10^6 bytes), what a float32 file of them roughly weighs."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 1e6


def compiled_gflops(compiled: jax.stages.Compiled) -> float:
    """GFLOPs of one call of an AOT-compiled function, from XLA's cost analysis (NaN if it has none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # Older jax versions return one dict per device.
    return float((cost or {}).get("flops", float("nan"))) / 1e9


def median_latency_ms(fn: Callable[[], object], *, runs: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in ms over ``runs`` calls after ``warmup`` calls (``fn`` must block)."""
    for _ in range(warmup):
        fn()
    return 1e3 * statistics.median(timeit.repeat(fn, number=1, repeat=runs))


def inference_profile(
    model: nn.Module, variables: dict, *, image_shape: tuple[int, int, int], runs: int = 10
) -> dict:
    """Parameters, their size, GFLOPs per image and latency at batch 1 of ``model`` in inference mode.

    The forward pass is jitted and compiled ahead of time on a ``(1, *image_shape)`` zero batch; latency is
    the median over ``runs`` calls after compilation and warm-up, on JAX's default device.
    """
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    image = jnp.zeros((1, *image_shape), jnp.float32)
    compiled = forward.lower(variables, image).compile()
    return {
        "params": count_params(variables["params"]),
        "params_mb": size_mb(variables["params"]),
        "gflops_per_image": compiled_gflops(compiled),
        "latency_b1_ms": median_latency_ms(
            lambda: jax.block_until_ready(compiled(variables, image)), runs=runs
        ),
        "device": jax.devices()[0].platform,
    }


def model_card(model: run_dir.TrainedModel, *, latency_runs: int = 10) -> dict:
    """Size, compute, latency, training data, recipe and training summary of a run (JSON-ready)."""
    config, run = model.config, model.run_dir
    info = run.read_dataset_info()
    recipe = {
        "model_name": config.model_name,
        "model": config.model.to_dict(),
        "init_from": config.get("init_from", {}).get("path"),
        "optimizer": config.optim.name,
        "learning_rate": config.optim.learning_rate,
        "weight_decay": config.optim.weight_decay,
        "schedule": config.optim.schedule,
        "epochs": config.train.num_epochs,
        "batch_size": config.data.batch_size,
        "image_size": f"{config.data.image_size}x{config.data.image_size}x{config.data.channels}",
        "loss": config.loss.to_dict(),
        "augmentations": {k: v for k, v in config.data.augment.to_dict().items() if v},
        "seed": config.seed,
    }
    saved = run.read_report()
    keys = ("steps", "total_steps", "best_step", "stopped_early", "wall_time_s")
    training = {k: saved[k] for k in keys if k in saved} if saved is not None else None
    return {
        "profile": inference_profile(
            model.model, model.variables, image_shape=model.image_shape, runs=latency_runs
        ),
        "training_data": {
            "dataset": config.data.name,
            "class_names": info["class_names"],
            "label_counts": info["label_counts"],
        },
        "recipe": recipe,
        "training": training,
    }


def ensemble_card(cards: Sequence[dict]) -> dict:
    """The model card of an ensemble: totals of the members' profiles (their latencies add, as the
    members run one after another), the first member's training data and recipe, every member's card."""
    profiles = [card["profile"] for card in cards]
    summed = ("params", "params_mb", "gflops_per_image", "latency_b1_ms")
    total = {key: sum(p[key] for p in profiles) for key in summed} | {"device": profiles[0]["device"]}
    return {
        "profile": total,
        "training_data": cards[0]["training_data"],
        "recipe": cards[0]["recipe"],
        "members": list(cards),
    }
