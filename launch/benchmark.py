"""Whole-training-step benchmark of medjax models against PyTorch peers, interleaved in rounds.

For each model (MobileNetV2 1.0, ConvNeXt-Tiny, MedNeXt-tiny) at 224x224x3, batch 32, 2 classes, AdamW:
training images/s of the compiled ``medjax.train_step`` step (optimizer included, ``block_until_ready``),
compile time, eval-mode latency at batch 1 and throughput at batch N, peak RSS next to XLA's planned
buffers (``compiled.memory_analysis()``), page faults per step, parameters and XLA GFLOPs per step. When
torch imports, the PyTorch peers of ``launch/torch_reference.py`` run in the same rounds (eager and
``torch.compile``, channels_last).

Like for like: every case runs in a fresh subprocess pinned to the same ``--threads`` cores (XLA sizes
its pool to them, PyTorch gets ``set_num_threads``) under the same ``--allocator``. Every round runs every
case once, in an order rotated from round to round (``timing.rotated``), so a busy minute on a shared
machine hits all cases alike; each figure is the median over rounds with its min/max, each ratio the ratio
of medians (``timing.spread``, ``timing.ratio``), and the load average before and after each case is
kept. The JSON (default ``results/benchmark_<UTC time>.json``) also records commit, versions, allocator
and cores. Example (about 25 minutes per round on 2 cores)::

    python launch/benchmark.py --allocator auto --rounds 3
    python launch/studies_table.py results/benchmark_<UTC time>.json   # the studies' recipes in hours
    # quick look: --models mobilenet_v2 --steps 3 --warmup 1 --rounds 2 --skip_torch_compile
    # memory:     --models convnext --remat none --remat block --skip_torch
    # flag A/B:   --xla_flags= --xla_flags=--xla_cpu_use_xnnpack=true
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import timing

from medjax import allocator  # Imports no jax: the parent only sets each case's environment.

MODELS = ("mobilenet_v2", "convnext", "mednext_plos")
MODEL_KWARGS = {
    "mobilenet_v2": {"width_multiplier": 1.0},
    "convnext": {"variant": "tiny", "drop_path_rate": 0.1},
    "mednext_plos": {"variant": "tiny"},
}
TORCH_IMPLS = ("eager", "compile")
# The roofline case: one (n x n) @ (n x n) float32 product, 2 n^3 FLOPs (137 GFLOP), long enough (about a
# second on 2 cores) for either library to reach its peak. A model step's FLOPs per second against the
# matmul peak of the library medjax trains with (``native.matmul_preferred``: oneMKL's sgemm on an Intel
# CPU where it is installed, else XLA's dot),
# measured in the same round, says how much of the step is left to gain.
ROOFLINE_N = 4096
ROOFLINE_CASE = "medjax:matmul:roofline"
# Per-case figures summarised over rounds (median, min, max).
FIGURES = (
    "train_images_per_s",
    "gflop_per_s",
    "matmul_gflop_per_s",
    "compile_s",
    "infer_b1_ms",
    "infer_images_per_s",
    "peak_rss_mb",
    "faults_per_step",
)


def run_medjax(args: argparse.Namespace, name: str, impl: str) -> dict:
    """One medjax case; jax is imported here so that the parent can set ``XLA_FLAGS`` first."""
    import jax
    import medjax_step

    from medjax import config_lib, losses, models

    model = models.get_model(
        name, num_classes=args.num_classes, remat=args.remat, depthwise_impl=impl, **MODEL_KWARGS[name]
    )
    step = medjax_step.compile_train_step(
        model,
        optim_cfg=config_lib.base_config().optim,  # AdamW, lr 1e-3, weight decay 0.05, cosine.
        loss_fn=losses.make_loss_fn({"cross_entropy": {"weight": 1.0}}),
        batch_size=args.batch,
        image_shape=(args.size, args.size, 3),
        num_classes=args.num_classes,
    )
    result = {
        **_timed_train(step.run, args),
        "params": sum(x.size for x in jax.tree.leaves(step.state.params)),
        "planned_mb": step.planned_mb(),
        "compile_s": step.compile_s,
    }
    if not args.train_only:
        result.update(_timed_inference(step, args))
    result["peak_rss_mb"] = timing.peak_rss_mb()
    if args.count_flops:  # Compiles the step once more: its memory is not training's, so read after the peak.
        result["gflops_per_step"] = step.gflops()
    return result


def _timed_inference(step, args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    variables = step.state.variables
    eval_batch = {**step.batch, "mask": jnp.ones((args.batch,), bool)}
    one = {k: v[:1] for k, v in eval_batch.items()}
    jax.block_until_ready(step.evaluate(variables, one, {}))  # Compiles both shapes outside the timing.
    jax.block_until_ready(step.evaluate(variables, eval_batch, {}))
    return {
        "infer_b1_times_s": timing.timed(
            lambda: jax.block_until_ready(step.evaluate(variables, one, {})),
            steps=max(args.steps, 5),
            warmup=1,
        ),
        "infer_batch_times_s": timing.timed(
            lambda: jax.block_until_ready(step.evaluate(variables, eval_batch, {})),
            steps=args.steps,
            warmup=1,
        ),
    }


def _timed_train(step, args: argparse.Namespace) -> dict:
    for _ in range(args.warmup):
        step()
    faults = timing.minor_faults()
    times = timing.timed(step, steps=args.steps, warmup=0)
    return {"train_step_times_s": times, "faults_per_step": (timing.minor_faults() - faults) / args.steps}


def run_torch(args: argparse.Namespace, name: str, impl: str) -> dict:
    """One PyTorch case; ``impl`` is 'eager' or 'compile'."""
    import torch_reference

    faults = timing.minor_faults()
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
    # Whole-run faults: torch_reference times its steps itself; per step they are an upper bound.
    steps = args.steps + args.warmup + max(args.steps, 5) + 2 * args.warmup
    result["faults_per_step"] = (timing.minor_faults() - faults) / steps
    result["compile_s"] = result["first_step_s"] - statistics.median(result["train_step_times_s"])
    return result


def run_roofline(args: argparse.Namespace, framework: str) -> dict:
    """Seconds of each timed ``ROOFLINE_N``-square float32 matmul, in the library ``framework`` trains with
    (medjax's native oneMKL product where ``native.matmul_preferred``, else XLA's jitted ``jnp.matmul``;
    ``torch.mm``) on the case's cores."""
    n = ROOFLINE_N
    if framework == "medjax":
        import jax
        import jax.numpy as jnp

        from medjax.models import native

        a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.float32)
        library = "oneMKL" if native.matmul_preferred() else "XLA"
        matmul = jax.jit(native.matmul if library == "oneMKL" else jnp.matmul)
        run = lambda: jax.block_until_ready(matmul(a, b))  # noqa: E731
        return {
            "matmul_n": n,
            "matmul_library": library,
            "matmul_times_s": timing.timed(run, steps=max(args.steps, 5), warmup=1),
        }
    else:
        import torch

        torch.set_num_threads(args.threads)
        a, b = torch.randn(2, n, n).unbind()
        run = lambda: torch.mm(a, b)  # noqa: E731
    return {"matmul_n": n, "matmul_times_s": timing.timed(run, steps=max(args.steps, 5), warmup=1)}


def _worker(args: argparse.Namespace) -> None:
    framework, name, impl = args.worker.split(":")
    # Before any framework starts its thread pool: both sides run on the same cores.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    if impl == "roofline":
        raw = run_roofline(args, framework)
    else:
        raw = (run_medjax if framework == "medjax" else run_torch)(args, name, impl)
    raw.setdefault("peak_rss_mb", timing.peak_rss_mb())
    raw["allocator_active"] = allocator.active()
    print("RESULT " + json.dumps(raw), flush=True)


def _spawn(args: argparse.Namespace, case: dict, gflops: float | None = None) -> dict:
    """Runs ``case`` in a fresh interpreter under its allocator, with its flags in ``XLA_FLAGS``. A medjax
    case counts its step's FLOPs unless ``gflops`` (an earlier round's count, the same step) is given."""
    env = allocator.environment(case["allocator"], dict(os.environ, JAX_PLATFORMS="cpu"))
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {case['xla_flags']}".strip()
    forwarded = [
        f"--{n}={getattr(args, n)}" for n in ("batch", "size", "num_classes", "steps", "warmup", "threads")
    ]
    forwarded += ["--train_only"] if args.train_only else []
    forwarded += ["--count_flops"] if gflops is None else []
    cmd = [sys.executable, __file__, "--worker", case["case"], f"--remat={case['remat']}", *forwarded]
    load_before = timing.load_average()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    record = {
        "wall_s": time.perf_counter() - start,
        "load_before": load_before,
        "load_after": timing.load_average(),
    }
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        return {**record, "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    raw = json.loads(lines[-1][len("RESULT ") :])
    med = statistics.median
    if "matmul_times_s" in raw:
        return {
            **record,
            "matmul_gflop_per_s": 2 * raw["matmul_n"] ** 3 / 1e9 / med(raw["matmul_times_s"]),
            **raw,
        }
    if "infer_b1_times_s" in raw:
        record["infer_b1_ms"] = 1e3 * med(raw["infer_b1_times_s"])
        record["infer_images_per_s"] = args.batch / med(raw["infer_batch_times_s"])
    record["train_images_per_s"] = args.batch / med(raw["train_step_times_s"])
    if gflops is not None:
        raw.setdefault("gflops_per_step", gflops)
    if raw.get("gflops_per_step"):
        record["gflop_per_s"] = raw["gflops_per_step"] * record["train_images_per_s"] / args.batch
    return {**record, **raw}


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def make_cases(args: argparse.Namespace, with_torch: bool) -> list[dict]:
    """Every case of one round; PyTorch peers once per allocator (they have no XLA flags nor remat), and
    each allocator's matmul rooflines."""
    torch_impls = TORCH_IMPLS[:1] if args.skip_torch_compile else TORCH_IMPLS
    cases = []
    for alloc in args.allocator:
        frameworks = ("medjax", "torch") if with_torch else ("medjax",)
        cases += [
            {"case": f"{fw}:matmul:roofline", "xla_flags": "", "remat": "none", "allocator": alloc}
            for fw in frameworks
        ]
    for alloc, name in itertools.product(args.allocator, args.models.split(",")):
        for flags, remat in itertools.product(args.xla_flags, args.remat):
            cases.append({"case": f"medjax:{name}:{args.depthwise_impl}", "xla_flags": flags, "remat": remat})
            cases[-1]["allocator"] = alloc
        if with_torch:
            cases += [
                {"case": f"torch:{name}:{impl}", "xla_flags": "", "remat": "none", "allocator": alloc}
                for impl in torch_impls
            ]
    return cases


def _key(case: dict) -> tuple:
    return case["case"], case["xla_flags"], case["remat"], case["allocator"]


def summarise(cases: list[dict], rounds: list[list[dict]]) -> list[dict]:
    """Per case: :func:`timing.spread` of each figure over the rounds it succeeded in, its errors, the
    load averages it ran under, the ratios to the PyTorch peers under the same allocator, and the
    fraction of medjax's matmul roofline (:data:`ROOFLINE_CASE`) each medjax step's FLOPs reach."""
    summary = []
    for case in cases:
        runs = [r for rnd in rounds for r in rnd if _key(r) == _key(case)]
        ok = [r for r in runs if "error" not in r]
        row = {**case, "rounds_ok": len(ok), "errors": [r["error"] for r in runs if "error" in r]}
        row["load"] = [[r["load_before"], r["load_after"]] for r in runs]
        if ok:
            row.update({f: timing.spread([r[f] for r in ok]) for f in FIGURES if f in ok[0]})
            first = ok[0]
            for k in ("params", "gflops_per_step", "planned_mb", "allocator_active", "matmul_library"):
                if k in first:
                    row[k] = first[k]
        summary.append(row)
    by_case = {(r["case"], r["allocator"]): r for r in summary if r["rounds_ok"]}
    for row in summary:
        _, name, _ = row["case"].split(":")
        if not row["case"].startswith("medjax:") or "train_images_per_s" not in row:
            continue
        for impl in TORCH_IMPLS:
            peer = by_case.get((f"torch:{name}:{impl}", row["allocator"]))
            if peer:
                row[f"vs_torch_{impl}"] = timing.ratio(row["train_images_per_s"], peer["train_images_per_s"])
        roofline = by_case.get((ROOFLINE_CASE, row["allocator"]))
        if roofline and "gflop_per_s" in row:
            row["vs_roofline"] = timing.ratio(row["gflop_per_s"], roofline["matmul_gflop_per_s"])
    return summary


def markdown(summary: list[dict]) -> str:
    """The summary as a table: each figure ``median [min-max]`` over the rounds."""
    head = (
        "| case | allocator | remat | XLA flags | train img/s | vs torch eager | vs torch compile "
        "| GFLOP/s | of medjax matmul roofline | compile s | infer b1 ms | infer img/s | peak RSS MB "
        "| XLA planned MB | faults/step | load |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in summary:
        cells = [r["case"], r["allocator_active"] if "allocator_active" in r else r["allocator"]]
        cells += [r["remat"], r["xla_flags"] or "-"]
        if not r["rounds_ok"]:
            rows.append("| " + " | ".join([*cells, f"error: {r['errors'][-1:]}"]) + " |")
            continue
        if r["case"].endswith(":roofline"):  # Its one figure is the matmul's GFLOP/s.
            cells[0] += f" ({r['matmul_library']})" if "matmul_library" in r else ""
            cells += ["-"] * 3 + [timing.fmt(r["matmul_gflop_per_s"], 1)] + ["-"] * 6
            loads = [x for pair in r["load"] for x in pair]
            rows.append("| " + " | ".join([*cells, f"{min(loads):.1f}-{max(loads):.1f}"]) + " |")
            continue
        cells += [timing.fmt(r["train_images_per_s"])]
        cells += [timing.fmt(r[k]) if k in r else "-" for k in ("vs_torch_eager", "vs_torch_compile")]
        cells += [timing.fmt(r[k], 1) if k in r else "-" for k in ("gflop_per_s",)]
        cells += [timing.fmt(r[k]) if k in r else "-" for k in ("vs_roofline",)]
        digits = {"compile_s": 0, "infer_b1_ms": 1, "infer_images_per_s": 1, "peak_rss_mb": 0}
        cells += [timing.fmt(r[k], d) if k in r else "-" for k, d in digits.items()]
        cells += [f"{r['planned_mb']['total']:.0f}" if r.get("planned_mb") else "-"]
        cells += [timing.fmt(r["faults_per_step"], 0)]
        loads = [x for pair in r["load"] for x in pair]
        cells += [f"{min(loads):.1f}-{max(loads):.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + str(MODELS))
    parser.add_argument("--depthwise_impl", choices=("fast", "xla"), default="fast")
    parser.add_argument("--rounds", type=int, default=3, help="every case once per round, order rotated")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per case and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="cores of every case (both frameworks)",
    )
    parser.add_argument("--xla_flags", action="append", help="repeatable, one medjax case each; default none")
    parser.add_argument(
        "--remat", action="append", help="repeatable train.remat value, one medjax case each; default none"
    )
    parser.add_argument(
        "--allocator", action="append", choices=allocator.CHOICES, help="repeatable; default: auto"
    )
    parser.add_argument("--train_only", action="store_true", help="no inference timing (memory runs)")
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--skip_torch_compile", action="store_true")
    parser.add_argument("--out", type=Path, help="JSON path; default results/benchmark_<UTC time>.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # framework:model:impl, set by the parent.
    parser.add_argument("--count_flops", action="store_true", help=argparse.SUPPRESS)  # Set by the parent.
    args = parser.parse_args(argv)
    args.xla_flags = args.xla_flags or [""]
    args.remat = args.remat or ["none"]
    args.allocator = [allocator.resolve(a) for a in args.allocator or ["auto"]]
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        args.remat = args.remat[0]
        _worker(args)
        return
    cases = make_cases(args, with_torch=not args.skip_torch and _torch_available())
    rounds, gflops = [], {}  # A case's FLOPs per step, counted in the first round that ran it.
    for index in range(args.rounds):
        rounds.append([])
        for case in timing.rotated(cases, index):
            result = {**case, "round": index, **_spawn(args, case, gflops.get(_key(case)))}
            if result.get("gflops_per_step"):
                gflops[_key(case)] = result["gflops_per_step"]
            rounds[-1].append(result)
            if "matmul_gflop_per_s" in result:
                speed = f"{result['matmul_gflop_per_s']:.1f} GFLOP/s"
            else:
                speed = f"{result.get('train_images_per_s', float('nan')):.2f} img/s"
            print(
                f"round {index + 1}/{args.rounds} {case['case']} [{case['allocator']}, "
                f"remat {case['remat']}, {case['xla_flags'] or 'default flags'}]: {speed}, "
                f"peak RSS {result.get('peak_rss_mb', 0):.0f} MB (XLA planned "
                f"{result.get('planned_mb', {}).get('total', 0):.0f}), {result['wall_s']:.0f} s, "
                f"load {result['load_before']}->{result['load_after']}",
                flush=True,
            )
    summary = summarise(cases, rounds)
    print(f"\nbatch {args.batch}, {args.size}x{args.size}, {args.threads} threads, {args.rounds} rounds\n")
    print(markdown(summary))
    out = args.out or timing.REPO / "results" / f"benchmark_{datetime.now(UTC):%Y-%m-%dT%H%M}.json"
    meta = timing.run_record(threads=args.threads, rounds=args.rounds)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "rounds": rounds}, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
