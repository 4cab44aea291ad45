"""Micro-benchmark of depthwise convolution: medjax's implementations against PyTorch in one run.

``--impls`` (default ``xla,loop,native``): XLA's grouped convolution; medjax's shifted sums with the kernel
gradient from the pure-XLA row loop; medjax's native kernels for the forward pass and both gradients
(``'fast'`` is ``native`` when it builds, else ``loop``).

Forward and forward+backward (gradients wrt input and kernel) wall time, median of repeats after warm-up.
PyTorch is timed in the same process when importable (channels_last, ``torch.no_grad`` for the forward,
same thread count), so the ratios are comparable on a noisy shared machine. Example::

    JAX_PLATFORMS=cpu /work/venv-torch/bin/python launch/bench_depthwise.py --out /tmp/bench_depthwise.json
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax

from medjax.models.depthwise import depthwise_conv2d, resolve_padding

# (N, H, W, C, kernel, stride, dilation): ConvNeXt stage 1 and 4, MobileNetV2, the MedNeXt dilated branch.
DEFAULT_SHAPES = (
    "32x56x56x96:k7s1d1,32x7x7x768:k7s1d1,32x112x112x96:k3s2d1,32x56x56x144:k3s1d1,"
    "32x14x14x576:k3s1d1,32x28x28x96:k7s1d3"
)


def _parse_shapes(spec: str) -> list[tuple[int, ...]]:
    shapes = []
    for item in spec.split(","):
        dims, conv = item.split(":")
        k, rest = conv[1:].split("s")
        s, d = rest.split("d")
        shapes.append((*(int(v) for v in dims.split("x")), int(k), int(s), int(d)))
    return shapes


def _median_ms(fn: Callable[[], object], *, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_jax(shape, impl: str, *, repeats: int, warmup: int) -> dict[str, float]:
    n, h, w, c, k, s, d = shape
    padding = resolve_padding("SAME", (k, k), (d, d))
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, h, w, c))
    kernel = jax.random.normal(kk, (k, k, 1, c)) * 0.1

    def conv(x, kernel):
        return depthwise_conv2d(x, kernel, strides=(s, s), padding=padding, dilation=(d, d), impl=impl)

    fwd = jax.jit(conv)
    g = jax.random.normal(kk, fwd(x, kernel).shape)

    @jax.jit
    def fwd_bwd(x, kernel, g):
        # An explicit cotangent, not grad of a sum: XLA CPU's full reduction would dominate the timing.
        y, vjp = jax.vjp(conv, x, kernel)
        return y, vjp(g)

    return {
        "fwd_ms": _median_ms(lambda: jax.block_until_ready(fwd(x, kernel)), repeats=repeats, warmup=warmup),
        "fwd_bwd_ms": _median_ms(
            lambda: jax.block_until_ready(fwd_bwd(x, kernel, g)), repeats=repeats, warmup=warmup
        ),
    }


def bench_torch(shape, *, repeats: int, warmup: int) -> dict[str, float]:
    import torch

    n, h, w, c, k, s, d = shape
    conv = torch.nn.Conv2d(c, c, k, stride=s, padding=(k - 1) * d // 2, dilation=d, groups=c, bias=False)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(n, c, h, w).to(memory_format=torch.channels_last)
    xg = x.clone().requires_grad_(True)
    g = torch.randn_like(conv(x)).contiguous(memory_format=torch.channels_last)

    def fwd():
        with torch.no_grad():
            conv(x)

    def fwd_bwd():
        conv.zero_grad(set_to_none=True)
        xg.grad = None
        conv(xg).backward(g)

    return {
        "fwd_ms": _median_ms(fwd, repeats=repeats, warmup=warmup),
        "fwd_bwd_ms": _median_ms(fwd_bwd, repeats=repeats, warmup=warmup),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="NxHxWxC:k<kernel>s<stride>d<dilation>,...")
    parser.add_argument("--impls", default="xla,loop,native", help="depthwise_impl values, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    peers = {
        impl: (lambda sh, impl=impl: bench_jax(sh, impl, repeats=args.repeats, warmup=args.warmup))
        for impl in args.impls.split(",")
    }
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            peers["torch"] = lambda sh: bench_torch(sh, repeats=args.repeats, warmup=args.warmup)
        except ImportError:
            print("torch not importable: PyTorch column skipped", file=sys.stderr)

    rows = []
    header = f"{'shape':<28}" + "".join(f"{p + ' fwd':>12}{p + ' f+b':>12}" for p in peers)
    print(header)
    for shape in _parse_shapes(args.shapes):
        n, h, w, c, k, s, d = shape
        name = f"{n}x{h}x{w}x{c} k{k} s{s} d{d}"
        row = {"shape": name, **{p: fn(shape) for p, fn in peers.items()}}
        rows.append(row)
        cells = "".join(f"{row[p]['fwd_ms']:>12.1f}{row[p]['fwd_bwd_ms']:>12.1f}" for p in peers)
        print(f"{name:<28}{cells}", flush=True)
    if args.out:
        meta = {"jax": jax.__version__, "cpu_count": os.cpu_count(), "repeats": args.repeats}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
