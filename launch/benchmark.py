"""Whole-training-step benchmark of medjax models against PyTorch peers, in one run.

For each model (MobileNetV2 1.0, ConvNeXt-Tiny, MedNeXt-tiny) at 224x224x3, batch 32, 2 classes, AdamW:
training images/s of the jitted ``medjax.train`` step (optimizer included, median over timed steps after
warm-up, ``block_until_ready``), compile time, eval-mode latency at batch 1 and throughput at batch N,
peak RSS, parameters and XLA GFLOPs per step (``cost_analysis``). When torch imports, the PyTorch peers of
``launch/torch_reference.py`` (all three models; MedNeXt's transcribes medjax's ``mednext_plos``) are timed
in the same run (eager and ``torch.compile``, channels_last, same thread count) and the ratios medjax/torch
are printed.

Every case runs in a fresh subprocess: peak RSS is then the case's own, and ``--xla_flags`` and
``--allocator`` variants (read once per process) can be compared in one run; PyTorch peers run under each
allocator too, so every ratio compares like with like. Example (about 25 minutes on 2 cores)::

    JAX_PLATFORMS=cpu /work/venv-torch/bin/python launch/benchmark.py --depthwise_impl fast \
        --allocator system --allocator tcmalloc --out /tmp/benchmark.json
    # quick look: --models mobilenet_v2 --steps 3 --warmup 1 --skip_torch_compile
    # flag A/B:   --xla_flags= --xla_flags=--xla_cpu_use_xnnpack=true --depthwise_impl fast
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import timed

from medjax import allocator  # Imports no jax: the parent only sets each case's environment.

MODELS = ("mobilenet_v2", "convnext", "mednext_plos")
MODEL_KWARGS = {
    "mobilenet_v2": {"width_multiplier": 1.0},
    "convnext": {"variant": "tiny", "drop_path_rate": 0.1},
    "mednext_plos": {"variant": "tiny"},
}
TORCH_PEERS = ("mobilenet_v2", "convnext", "mednext_plos")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB.


def run_medjax(args: argparse.Namespace, name: str, impl: str) -> dict:
    """One medjax case; jax is imported here so that the parent can set ``XLA_FLAGS`` first."""
    import jax
    import jax.numpy as jnp

    from medjax import config_lib, losses, models, optim, tasks, train
    from medjax.evaluate import model_card as profiling

    model = models.get_model(name, num_classes=args.num_classes, **MODEL_KWARGS[name], depthwise_impl=impl)
    loss_fn = losses.make_loss_fn({"cross_entropy": {"weight": 1.0}})
    image_shape = (args.size, args.size, 3)
    key = jax.random.key(0)
    variables = train.init_variables(model, rng=key, image_shape=image_shape)
    optim_cfg = config_lib.base_config().optim  # AdamW, lr 1e-3, weight decay 0.05, cosine.
    tx, _ = optim.make_optimizer(optim_cfg, variables["params"], total_steps=1000, steps_per_epoch=100)
    state = train.create_train_state(tx, variables)
    p_train, p_eval = train.make_steps(model, tx, loss_fn, tasks.get_task("classification"))

    k_img, k_lab = jax.random.split(jax.random.key(1))
    images = jax.random.normal(k_img, (args.batch, *image_shape), jnp.float32)
    labels = jax.random.randint(k_lab, (args.batch,), 0, args.num_classes)
    batch = {"image": images, "label": labels}

    # AOT lower + compile: the same jitted function users call, with compilation timed on its own.
    start = time.perf_counter()
    compiled = p_train.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start

    def step():
        nonlocal state
        state, step_metrics = compiled(state, batch, key)
        jax.block_until_ready((state, step_metrics))

    train_times = timed(step, steps=args.steps, warmup=args.warmup)

    variables = state.variables
    eval_batch = {**batch, "mask": jnp.ones((args.batch,), bool)}
    one = {k: v[:1] for k, v in eval_batch.items()}
    start = time.perf_counter()
    jax.block_until_ready(p_eval(variables, one, {}))
    eval_compile_s = time.perf_counter() - start
    jax.block_until_ready(p_eval(variables, eval_batch, {}))  # Compiles the batch-N shape outside the timing.
    latency = timed(
        lambda: jax.block_until_ready(p_eval(variables, one, {})), steps=max(args.steps, 5), warmup=1
    )
    throughput = timed(
        lambda: jax.block_until_ready(p_eval(variables, eval_batch, {})), steps=args.steps, warmup=1
    )
    return {
        "params": profiling.count_params(state.params),
        "gflops_per_step": profiling.compiled_gflops(compiled),
        "compile_s": compile_s,
        "first_eval_s": eval_compile_s,
        "train_step_times_s": train_times,
        "infer_b1_times_s": latency,
        "infer_batch_times_s": throughput,
    }


def run_torch(args: argparse.Namespace, name: str, impl: str) -> dict:
    """One PyTorch case; ``impl`` is 'eager' or 'compile'."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch_reference

    result = torch_reference.benchmark(
        name,
        compiled=impl == "compile",
        batch=args.batch,
        size=args.size,
        num_classes=args.num_classes,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
    )
    result["compile_s"] = result["first_step_s"] - statistics.median(result["train_step_times_s"])
    return result


def _summarise(raw: dict, batch: int) -> dict:
    med = statistics.median
    return {
        "train_images_per_s": batch / med(raw["train_step_times_s"]),
        "step_s_min_max": [min(raw["train_step_times_s"]), max(raw["train_step_times_s"])],
        "infer_b1_ms": 1e3 * med(raw["infer_b1_times_s"]),
        "infer_images_per_s": batch / med(raw["infer_batch_times_s"]),
        **raw,
    }


def _worker(args: argparse.Namespace) -> None:
    framework, name, impl = args.worker.split(":")
    raw = (run_medjax if framework == "medjax" else run_torch)(args, name, impl)
    raw["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(raw), flush=True)


def _spawn(args: argparse.Namespace, case: str, xla_flags: str, memory_allocator: str) -> dict:
    """Runs ``case`` in a fresh interpreter under ``memory_allocator`` with ``xla_flags`` in ``XLA_FLAGS``."""
    env = allocator.environment(memory_allocator, dict(os.environ, JAX_PLATFORMS="cpu"))
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()
    cmd = [sys.executable, __file__, "--worker", case, *_forwarded(args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return _summarise(json.loads(lines[-1][len("RESULT ") :]), args.batch)


def _forwarded(args: argparse.Namespace) -> list[str]:
    names = ("batch", "size", "num_classes", "steps", "warmup", "threads")
    return [item for n in names for item in (f"--{n}", str(getattr(args, n)))]


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _cases(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(case, xla_flags, allocator) in run order: per allocator and model, medjax cases, then PyTorch peers.

    The peers run under the same allocator as the medjax cases they are compared with.
    """
    impls = ("fast", "xla") if args.depthwise_impl == "both" else (args.depthwise_impl,)
    torch_impls = [] if args.skip_torch or not _torch_available() else ["eager"]
    if torch_impls and not args.skip_torch_compile:
        torch_impls.append("compile")
    cases = []
    for alloc in args.allocator:
        for name in args.models.split(","):
            cases += [(f"medjax:{name}:{impl}", flags, alloc) for impl in impls for flags in args.xla_flags]
            if name in TORCH_PEERS:
                cases += [(f"torch:{name}:{impl}", "", alloc) for impl in torch_impls]
    return cases


def _markdown(results: list[dict]) -> str:
    head = (
        "| case | allocator | XLA flags | train img/s | vs torch eager | vs torch compile | compile s "
        "| infer b1 ms | infer img/s | peak RSS MB | params M | GFLOPs/step |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    peers = {
        (r["case"], r["allocator"]): r for r in results if r["case"].startswith("torch:") and "error" not in r
    }
    for r in results:
        if "error" in r:
            rows.append(f"| {r['case']} | {r['allocator']} | {r['xla_flags']} | error: {r['error']} |")
            continue
        name = r["case"].split(":")[1]
        ratios = []
        for peer in ("eager", "compile"):
            p = peers.get((f"torch:{name}:{peer}", r["allocator"]))
            ratios.append(f"{r['train_images_per_s'] / p['train_images_per_s']:.2f}" if p else "-")
        gflops = f"{r['gflops_per_step']:.1f}" if "gflops_per_step" in r else "-"
        rows.append(
            f"| {r['case']} | {r['allocator']} | {r['xla_flags'] or '-'} | {r['train_images_per_s']:.2f} | "
            f"{ratios[0]} | {ratios[1]} | {r['compile_s']:.1f} | {r['infer_b1_ms']:.1f} | "
            f"{r['infer_images_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['params'] / 1e6:.2f} | {gflops} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + str(MODELS))
    parser.add_argument("--depthwise_impl", choices=("fast", "xla", "both"), default="both")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; XLA uses every core")
    parser.add_argument(
        "--xla_flags",
        action="append",
        help="repeatable, one medjax case each: --xla_flags= (none) --xla_flags=--xla_cpu_use_xnnpack=true",
    )
    parser.add_argument(
        "--allocator",
        action="append",
        choices=allocator.CHOICES,
        help="repeatable, every case once per allocator (medjax/allocator.py); default: system",
    )
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--skip_torch_compile", action="store_true")
    parser.add_argument("--out", type=Path, help="write all results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # framework:model:impl, set by the parent.
    args = parser.parse_args()
    args.xla_flags = args.xla_flags or [""]
    args.allocator = [allocator.resolve(a) for a in args.allocator or ["system"]]
    if args.worker:
        _worker(args)
        return

    results = []
    for case, flags, alloc in _cases(args):
        start = time.perf_counter()
        result = {"case": case, "xla_flags": flags, "allocator": alloc, **_spawn(args, case, flags, alloc)}
        result["wall_s"] = time.perf_counter() - start
        results.append(result)
        speed = result.get("train_images_per_s", float("nan"))
        label = f"{case} [{alloc}, {flags or 'default flags'}]"
        print(f"{label}: {speed:.2f} img/s ({result['wall_s']:.0f} s)", flush=True)
    table = _markdown(results)
    print(f"\nbatch {args.batch}, {args.size}x{args.size}, load average {os.getloadavg()}\n{table}")
    if args.out:
        meta = {"argv": sys.argv, "loadavg_end": os.getloadavg(), "cores": len(os.sched_getaffinity(0))}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
