"""Forward time of each part of a ConvNeXt block, medjax against PyTorch, at each stage's shape.

Where ConvNeXt-Tiny's forward pass loses to PyTorch (issue 24's benchmark: inference at 0.61x while the
training step is at 0.97x): the depthwise 7x7 convolution, LayerNorm, the two pointwise matmuls and the
exact GELU, each jitted alone (medjax's own layers, as ``models/convnext.py`` calls them) and each timed
against the PyTorch op that ``launch/torch_reference.py``'s ConvNeXt runs (``torch.no_grad``, channels_last
for the convolution, the same thread count). Median of ``--repeats`` calls after one warm-up, both in this
one process, so a busy machine slows both alike. Example::

    JAX_PLATFORMS=cpu python launch/bench_convnext_parts.py --batch 32
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import torch
import torch.nn.functional as F

from medjax.models.convnext import LN_EPSILON
from medjax.models.layers import Dense, DepthwiseConv, gelu

# (side, channels) of ConvNeXt-Tiny's four stages at 224x224.
STAGES = ((56, 96), (28, 192), (14, 384), (7, 768))


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def jax_part(module: nn.Module, x: jax.Array) -> Callable[[], object]:
    variables = module.init(jax.random.key(1), x)
    apply = jax.jit(module.apply)
    return lambda: jax.block_until_ready(apply(variables, x))


def parts(batch: int, side: int, channels: int) -> dict[str, tuple[Callable, Callable]]:
    """Per part, the medjax call and the PyTorch call on inputs of the stage's shape."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, side, side, channels))
    hidden = jax.random.normal(key, (batch, side, side, 4 * channels))
    gelu_jit = jax.jit(gelu)
    x_nchw = torch.randn(batch, channels, side, side).to(memory_format=torch.channels_last)
    x_nhwc, hidden_nhwc = (
        torch.randn(batch, side, side, channels),
        torch.randn(batch, side, side, 4 * channels),
    )
    dw_kernel = torch.randn(channels, 1, 7, 7)
    w1, w2 = torch.randn(4 * channels, channels), torch.randn(channels, 4 * channels)
    b1, b2 = torch.randn(4 * channels), torch.randn(channels)  # nn.Linear's bias, as medjax's Dense has.
    return {
        "depthwise 7x7": (
            jax_part(DepthwiseConv(7, padding=3), x),
            lambda: F.conv2d(x_nchw, dw_kernel, padding=3, groups=channels),
        ),
        "layernorm": (
            jax_part(nn.LayerNorm(epsilon=LN_EPSILON), x),
            lambda: F.layer_norm(x_nhwc, (channels,), eps=LN_EPSILON),
        ),
        "dense C->4C": (jax_part(Dense(4 * channels), x), lambda: F.linear(x_nhwc, w1, b1)),
        "gelu (4C)": (lambda: jax.block_until_ready(gelu_jit(hidden)), lambda: F.gelu(hidden_nhwc)),
        "dense 4C->C": (jax_part(Dense(channels), hidden), lambda: F.linear(hidden_nhwc, w2, b2)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="PyTorch threads (XLA uses every core)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| stage map | part | medjax ms | PyTorch ms | PyTorch time / medjax time |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for side, channels in STAGES:
            for name, (ours, theirs) in parts(args.batch, side, channels).items():
                a, b = median_ms(ours, args.repeats), median_ms(theirs, args.repeats)
                print(f"| {side}x{side}x{channels} | {name} | {a:.1f} | {b:.1f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
