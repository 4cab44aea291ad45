"""Regression check of a change: this checkout's training step against another revision's, interleaved.

Checks ``--ref`` out into a temporary git worktree, then alternates fresh subprocesses of the two
checkouts (``ref`` and ``new``, the working tree as it is, uncommitted edits included), the order rotated
each round, each compiling ``--config``'s model and optimizer for a random batch and timing ``--steps``
whole steps. The harness (``medjax_step.py``) is this checkout's for both sides; only ``medjax`` differs.
Prints each side's images/s (median [min-max] over rounds) and new/ref, with the load average; no
assertion: on a shared machine, read the range, not only the median. Example::

    python launch/ab_step.py --ref=main --config=configs/chest_xray.py --batch=32 --rounds=5
    python launch/ab_step.py --ref=HEAD~1 --config=configs/brain_mri.py --set=train.remat=block
"""

import argparse
import ast
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


def _worker(args: argparse.Namespace) -> None:
    """Times ``args.steps`` training steps of the medjax found first on ``sys.path`` (PYTHONPATH)."""
    import medjax_step

    import medjax
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", default="main", help="git revision to compare the working tree with")
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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
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
