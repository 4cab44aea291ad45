"""Regression check of a change: this checkout's training step against another revision's, interleaved.

Checks ``--ref`` out into a temporary git worktree, then alternates fresh subprocesses of the two
checkouts (``ref`` and ``new``, the working tree as it is, uncommitted edits included), the order rotated
each round, each compiling ``--config``'s model and optimizer for a random batch and timing ``--steps``
whole steps. The harness (``medjax_step.py``) is this checkout's for both sides; only ``medjax`` differs.
Prints each side's images/s (median [min-max] over rounds) and new/ref, with the load average; no
assertion: on a shared machine, read the range, not only the median. Example::

    python launch/ab_step.py --ref=main --config=configs/chest_xray.py --batch=32 --rounds=5
    python launch/ab_step.py --ref=HEAD~1 --config=configs/brain_mri.py --set=train.remat=block

With ``--switch=MODULE.NAME=VALUE`` it compares instead two steps of this checkout in one process: one
compiled with that module-level constant set to VALUE (new), one without (ref), timed one step each,
alternately, the order swapped every pair, for ``--pairs`` pairs; it prints ref/new per pair as median
[quartiles]. Why: a shared machine's speed wanders within seconds (on an AMD EPYC VM one process's
MobileNetV2 step took 0.66-1.18 s over 12 consecutive steps), so rounds of separate processes cannot
resolve a change of a few percent, while the two steps of a pair see the same seconds. The change must be
a switch read when the step is traced (a threshold, a flag), which a developer adds for the experiment::

    python launch/ab_step.py --config=configs/covid_ct.py --size=224 --batch=32 \
        --switch=medjax.models.native.MAX_FORWARD_KERNEL_WIDTH=0 --pairs=30
"""

import argparse
import ast
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import timing

SIDES = ("ref", "new")


def _apply(config, assignment: str) -> None:
    """``KEY=VALUE`` on a (dotted) config key; the value is a Python literal, else a string."""
    key, _, text = assignment.partition("=")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *parents, leaf = key.split(".")
    for parent in parents:
        config = config[parent]
    config[leaf] = value


def _compile_step(args: argparse.Namespace):
    """``(step, batch)``: ``args.config``'s training step (``medjax_step.TrainStep``), compiled for a random
    batch of the medjax found first on ``sys.path`` (PYTHONPATH)."""
    import medjax_step

    from medjax import config_lib, losses, models

    config = config_lib.load_config_file(args.config)
    for assignment in args.set:
        _apply(config, assignment)
    remat = config.train.get("remat", "none")
    model = models.get_model(
        config.model_name,
        num_classes=args.num_classes,
        **({"remat": remat} if remat != "none" else {}),
        **config.model,
    )
    size = args.size or config.data.image_size
    batch = args.batch or config.data.batch_size
    step = medjax_step.compile_train_step(
        model,
        optim_cfg=config.optim,
        loss_fn=losses.make_loss_fn(config.loss, class_counts=[1] * args.num_classes),
        batch_size=batch,
        image_shape=(size, size, config.data.channels),
        num_classes=args.num_classes,
    )
    return step, batch


def _switch(assignment: str) -> tuple[object, str, object]:
    """``(module, name, value)`` of ``MODULE.NAME=VALUE``; the value is a Python literal, else a string."""
    target, _, text = assignment.partition("=")
    module_name, _, name = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        sys.exit(f"ab_step: --switch={assignment}: cannot import {module_name!r} ({error}).")
    if not hasattr(module, name):
        sys.exit(f"ab_step: --switch={assignment}: {module_name} has no {name!r}.")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    return module, name, value


def _alternate(args: argparse.Namespace) -> None:
    """The ``--switch`` comparison (see the module docstring), in this process."""
    import medjax

    module, name, value = _switch(args.switch)
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        new, batch = _compile_step(args)
    finally:
        setattr(module, name, saved)
    ref, _ = _compile_step(args)
    for _ in range(args.warmup):
        new.run()
        ref.run()
    pairs = []
    for index in range(args.pairs):
        times = {
            side: timing.timed(step.run, steps=1, warmup=0)[0]
            for side, step in timing.rotated([("ref", ref), ("new", new)], index)
        }
        pairs.append(times)
    result = {"medjax": str(Path(medjax.__file__).parent), "batch": batch, "pairs": pairs}
    print("RESULT " + json.dumps(result), flush=True)


def _worker(args: argparse.Namespace) -> None:
    """Times ``args.steps`` training steps of the medjax found first on ``sys.path`` (PYTHONPATH)."""
    import medjax

    step, batch = _compile_step(args)
    for _ in range(args.warmup):
        step.run()
    faults = timing.minor_faults()
    times = timing.timed(step.run, steps=args.steps, warmup=0)
    result = {
        "medjax": str(Path(medjax.__file__).parent),
        "batch": batch,
        "step_s": statistics.median(times),
        "faults_per_step": (timing.minor_faults() - faults) / args.steps,
        "peak_rss_mb": timing.peak_rss_mb(),
        "compile_s": step.compile_s,
    }
    print("RESULT " + json.dumps(result), flush=True)


def _run_side(args: argparse.Namespace, root: Path, cache: Path) -> dict:
    from medjax import allocator  # This checkout's; it only sets the environment.

    env = allocator.environment(args.allocator, dict(os.environ, JAX_PLATFORMS="cpu"))
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)  # Later rounds of a side skip its compilation.
    forwarded = [
        f"--{n}={getattr(args, n)}" for n in ("config", "steps", "warmup", "batch", "size", "num_classes")
    ]
    if args.switch:
        forwarded += [f"--switch={args.switch}", f"--pairs={args.pairs}"]
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        *forwarded,
        *(f"--set={s}" for s in args.set),
    ]
    load_before = timing.load_average()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"ab_step: the {root} side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    if Path(result["medjax"]).resolve() != (root / "medjax").resolve():
        sys.exit(f"ab_step: the worker imported medjax from {result['medjax']}, not from {root}.")
    return {**result, "load": [load_before, timing.load_average()]}


def compare(runs: dict[str, list[dict]], batch: int) -> dict:
    """Images/s of each side as :func:`timing.spread` over rounds, and new/ref as :func:`timing.ratio`."""
    speed = {side: timing.spread([batch / r["step_s"] for r in runs[side]]) for side in SIDES}
    return {**speed, "new_over_ref": timing.ratio(speed["new"], speed["ref"])}


def switch_summary(pairs: list[dict[str, float]]) -> dict:
    """Of ``--switch`` pairs of step times (s): each side's median step time, and ref/new per pair as
    median and quartiles."""
    speedups = [pair["ref"] / pair["new"] for pair in pairs]
    q1, median, q3 = statistics.quantiles(speedups, n=4)
    step_s = {side: statistics.median(pair[side] for pair in pairs) for side in SIDES}
    return {"step_s": step_s, "ref_over_new": {"median": median, "q1": q1, "q3": q3}}


def _compare_switch(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="ab_step_") as tmp:
        run = _run_side(args, timing.REPO, Path(tmp) / "cache")
    summary = switch_summary(run["pairs"])
    step_s, speedup = summary["step_s"], summary["ref_over_new"]
    print(
        f"\n{args.config} at {timing.commit()}, --switch={args.switch}, {args.pairs} pairs of steps, "
        f"load {run['load'][0]}-{run['load'][1]}:\n"
        f"  ref {step_s['ref']:.3f} s/step, new {step_s['new']:.3f} s/step (medians)\n"
        f"  ref/new per pair: {speedup['median']:.3f} [quartiles {speedup['q1']:.3f}-{speedup['q3']:.3f}]"
    )
    if args.out:
        record = {"meta": timing.run_record(switch=args.switch), "run": run, "summary": summary}
        args.out.write_text(json.dumps(record, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--ref", default="main", help="git revision to compare the working tree with (not with --switch)"
    )
    parser.add_argument("--config", required=True, help="configs/x.py[:variant], read in each checkout")
    parser.add_argument("--set", action="append", default=[], help="repeatable KEY=VALUE config override")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side and round (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=0, help="0: the config's data.batch_size")
    parser.add_argument("--size", type=int, default=0, help="0: the config's data.image_size")
    parser.add_argument("--num_classes", type=int, default=2)
    parser.add_argument("--allocator", default="auto", help="medjax/allocator.py choice, for both sides")
    parser.add_argument("--out", type=Path, help="also write the rounds and the comparison as JSON")
    parser.add_argument("--switch", help="MODULE.NAME=VALUE: compare in one process with and without it")
    parser.add_argument("--pairs", type=int, default=30, help="with --switch: alternated pairs of steps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (_alternate if args.switch else _worker)(args)
        return
    if args.switch:
        _compare_switch(args)
        return

    with tempfile.TemporaryDirectory(prefix="ab_step_") as tmp:
        ref_root = Path(tmp) / "ref"
        subprocess.run(
            ["git", "-C", str(timing.REPO), "worktree", "add", "--detach", str(ref_root), args.ref],
            check=True,
        )
        ref_commit = timing.commit(ref_root)
        try:
            roots = {"ref": ref_root, "new": timing.REPO}
            runs = {side: [] for side in SIDES}
            for index in range(args.rounds):
                for side in timing.rotated(SIDES, index):
                    run = _run_side(args, roots[side], Path(tmp) / f"cache_{side}")
                    runs[side].append(run)
                    print(
                        f"round {index + 1} {side}: {run['step_s']:.3f} s/step, load {run['load']}",
                        flush=True,
                    )
        finally:
            subprocess.run(["git", "-C", str(timing.REPO), "worktree", "remove", "--force", str(ref_root)])
    result = compare(runs, batch=runs["new"][0]["batch"])
    loads = [x for side in SIDES for r in runs[side] for x in r["load"]]
    print(
        f"\n{args.config}, images/s, median [min-max] over {args.rounds} rounds, "
        f"load {min(loads)}-{max(loads)}:\n"
        f"  ref {args.ref} ({ref_commit}): {timing.fmt(result['ref'])}\n"
        f"  new {timing.commit()}: {timing.fmt(result['new'])}\n"
        f"  new/ref: {timing.fmt(result['new_over_ref'])}x"
    )
    if args.out:
        meta = timing.run_record(ref=args.ref, ref_commit=ref_commit)
        args.out.write_text(json.dumps({"meta": meta, "runs": runs, "comparison": result}, indent=1))


if __name__ == "__main__":
    main()
