"""oneMKL's sgemm against XLA's dot on ConvNeXt-Tiny's products: which one this CPU should train with.

medjax computes its layers' products with oneMKL on Intel CPUs and with XLA's dot elsewhere
(``native.matmul_preferred``), because oneMKL picks its kernels by CPU vendor. This times both, and
PyTorch's ``torch.mm`` as a third opinion, on the forward product and both gradients of each of
ConvNeXt-Tiny's per-pixel MLP layers at 224x224 (rows = batch x pixels), plus a 4096-square product, all on
this process's cores. Median GFLOP/s of ``--repeats`` calls after one warm-up, the libraries taking turns
call by call so a busy machine slows them alike. The last column is oneMKL's speed over XLA's. If XLA wins
where medjax chose oneMKL (or the reverse), ``MEDJAX_MKL=0`` (or ``=1``) overrides the choice. Example::

    JAX_PLATFORMS=cpu python launch/bench_matmul.py --batch 32
"""

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from medjax.models import native

# (pixels per image, channels) of ConvNeXt-Tiny's four stages at 224x224; each MLP is C -> 4C -> C.
STAGES = ((56 * 56, 96), (28 * 28, 192), (14 * 14, 384), (7 * 7, 768))


def products(batch: int) -> list[tuple[str, tuple[int, int], tuple[int, int], bool, bool]]:
    """(name, a's shape, b's shape, transpose_a, transpose_b) of each product: forward ``x @ W``, input
    gradient ``g @ W^T``, weight gradient ``x^T @ g``, for both layers of each stage's MLP."""
    found = [("4096 square", (4096, 4096), (4096, 4096), False, False)]
    for pixels, c in STAGES:
        rows = batch * pixels
        for k, n in ((c, 4 * c), (4 * c, c)):
            found += [
                (f"{rows}x{k} @ {k}x{n}", (rows, k), (k, n), False, False),
                (f"{rows}x{n} @ ({k}x{n})^T", (rows, n), (k, n), False, True),
                (f"({rows}x{k})^T @ {rows}x{n}", (rows, k), (rows, n), True, False),
            ]
    return found


def median_gflops(runs: dict[str, Callable[[], object]], flops: int, repeats: int) -> dict[str, float]:
    """Per library, median GFLOP/s of ``repeats`` calls after one warm-up, the libraries taking turns."""
    times = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: flops / statistics.median(t) / 1e9 for name, t in times.items()}


def product_runs(a_shape, b_shape, transpose_a: bool, transpose_b: bool, torch) -> dict[str, Callable]:
    """The product ``op(a) @ op(b)`` on random operands, as a call per library."""
    a, b = jax.random.normal(jax.random.key(0), a_shape), jax.random.normal(jax.random.key(1), b_shape)
    mkl = jax.jit(functools.partial(native.matmul, transpose_a=transpose_a, transpose_b=transpose_b))
    xla = jax.jit(lambda a, b: (a.T if transpose_a else a) @ (b.T if transpose_b else b))
    runs = {
        "oneMKL": lambda: jax.block_until_ready(mkl(a, b)),
        "XLA": lambda: jax.block_until_ready(xla(a, b)),
    }
    if torch is not None:
        a_t, b_t = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
        runs["torch"] = lambda: (a_t.T if transpose_a else a_t) @ (b_t.T if transpose_b else b_t)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip_torch", action="store_true")
    args = parser.parse_args()
    if not native.matmul_available():
        raise SystemExit(
            "oneMKL is not available here (no native kernels, no `mkl` package, or MEDJAX_MKL=0)."
        )
    torch = None
    if not args.skip_torch:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
    library = "oneMKL" if native.matmul_preferred() else "XLA's dot"
    print(f"CPU vendor {native.cpu_vendor() or '?'}; medjax trains with {library} here.")
    print("| product | oneMKL GFLOP/s | XLA GFLOP/s | torch GFLOP/s | oneMKL / XLA |")
    print("|---|---|---|---|---|")
    for name, a_shape, b_shape, ta, tb in products(args.batch):
        m, k = a_shape[::-1] if ta else a_shape
        flops = 2 * m * k * (b_shape[0] if tb else b_shape[1])
        gf = median_gflops(product_runs(a_shape, b_shape, ta, tb, torch), flops, args.repeats)
        torch_cell = f"{gf['torch']:.1f}" if "torch" in gf else "-"
        ratio = gf["oneMKL"] / gf["XLA"]
        print(f"| {name} | {gf['oneMKL']:.1f} | {gf['XLA']:.1f} | {torch_cell} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
