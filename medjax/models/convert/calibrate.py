"""BatchNorm statistics measured on a task's images, without changing what the model evaluates.

A BatchNorm in evaluation computes ``a * x + c`` per channel (``a = scale / sqrt(var + eps)``,
``c = bias - mean * a``); many (scale, bias, mean, var) give the same ``a`` and ``c``. In training mode it
normalises with the batch's own statistics instead, so the training pass only computes the evaluated
function when the stored statistics are those of the batches it sees. Pretrained weights whose
BatchNorms were folded into the convolutions (:mod:`medjax.models.convert.tflite`: mean 0, variance 1)
are far from that: every training pass would standardise each channel and drop the learned scale and
shift. :func:`calibrate_batch_norm` keeps ``a`` and ``c`` and sets, per BatchNorm, the statistics
``(m, v)`` of its input over the given images:

    mean = m,  var = v,  scale = a * sqrt(v + eps),  bias = c + a * m

Evaluation is unchanged (to float rounding) and the training pass reproduces the pretrained network on
batches whose statistics are like those images' (exactly on those images, as one batch). Calibrate on the
task's training images, preprocessed as in training but without augmentation; a few hundred suffice.
"""

from collections.abc import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medjax.models import layers

__all__ = ["batch_norm_input_moments", "calibrate_batch_norm"]

BATCH_NORMS = (nn.BatchNorm, layers.BatchNorm)


def batch_norm_input_moments(
    model: nn.Module, variables: Mapping, batches: Iterable[np.ndarray]
) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray, float]]:
    """Per BatchNorm (module path): the per-channel mean and (biased) variance of its input over all
    ``batches`` (NHWC, as the model takes them) in evaluation mode, and its epsilon."""
    epsilons: dict[tuple[str, ...], float] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, BATCH_NORMS):
            x = args[0].astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            module.sow("bn_moments", "moments", jnp.stack([jnp.mean(x, axes), jnp.mean(x * x, axes)]))
            epsilons[tuple(module.scope.path)] = module.epsilon
        return next_fun(*args, **kwargs)

    @jax.jit
    def moments(variables, x):
        with nn.intercept_methods(record):
            _, state = model.apply(variables, x, train=False, mutable=["bn_moments"])
        return state["bn_moments"]

    sums: dict[tuple[str, ...], np.ndarray] = {}
    count = 0
    for batch in batches:
        n = len(batch)
        for path, (value,) in traverse_util.flatten_dict(jax.device_get(moments(variables, batch))).items():
            sums[path[:-1]] = sums.get(path[:-1], 0.0) + n * np.asarray(value, np.float64)
        count += n
    if not count:
        raise ValueError("No images to calibrate the BatchNorm statistics on.")
    out = {}
    for path, total in sums.items():
        mean, mean_sq = total / count
        out[path] = (mean, np.maximum(mean_sq - mean * mean, 0.0), epsilons[path])
    return out


def calibrate_batch_norm(model: nn.Module, variables: Mapping, batches: Iterable[np.ndarray]) -> dict:
    """``variables`` with every BatchNorm's statistics measured on ``batches`` and its scale and bias
    adjusted so that evaluation computes the same function (module docstring).

    Args:
      model: the flax module (BatchNorms are found by type, at any depth).
      variables: ``{'params': ..., 'batch_stats': ...}``.
      batches: NHWC arrays, preprocessed as the model's inputs.

    Returns:
      New variables (the input is not modified).
    """
    params = traverse_util.flatten_dict(variables["params"])
    stats = traverse_util.flatten_dict(variables["batch_stats"])
    for path, (m, v, eps) in batch_norm_input_moments(model, variables, batches).items():
        scale, bias = (np.asarray(params[(*path, k)], np.float64) for k in ("scale", "bias"))
        old_mean, old_var = (np.asarray(stats[(*path, k)], np.float64) for k in ("mean", "var"))
        a = scale / np.sqrt(old_var + eps)
        c = bias - old_mean * a
        params[(*path, "scale")] = jnp.asarray(a * np.sqrt(v + eps), jnp.float32)
        params[(*path, "bias")] = jnp.asarray(c + a * m, jnp.float32)
        stats[(*path, "mean")] = jnp.asarray(m, jnp.float32)
        stats[(*path, "var")] = jnp.asarray(v, jnp.float32)
    return {
        **variables,
        "params": traverse_util.unflatten_dict(params),
        "batch_stats": traverse_util.unflatten_dict(stats),
    }
