"""Per-step cost of scaling out on one machine: 4 simulated CPU devices and 2 processes, against 1 device.

    python launch/scale_overhead.py --config=configs/brain_mri.py:smoke --batch_size=32 --steps=30

Runs the same jitted train step of ``--config`` at the same global batch in three settings, each in
fresh processes (JAX fixes its device count at start): 1 process with 1 device; 1 process with 4
devices (``--xla_force_host_platform_device_count=4``); 2 processes of 1 device joined by
``jax.distributed`` on 127.0.0.1 (gloo collectives). It times whole steps (placing the host batch with
``medjax.sharding.shard_batch``, the step, waiting for its result) after warm-up, on batches read
beforehand so input decoding is not counted, and prints a Markdown table of the median step time.

On a single CPU the simulated devices share the same cores, so this measures what the partitioning
and the collectives cost, not a speed-up: that needs more hardware (more GPUs, hosts or TPU chips).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = (("1 device", 1, 1), ("4 simulated devices, 1 process", 4, 1), ("2 processes x 1 device", 1, 2))


def _worker(args: argparse.Namespace) -> None:
    processes, rank, port = (int(v) for v in args.worker.split(","))
    from medjax import distributed

    if processes > 1:
        distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=processes, process_id=rank
        )
    import jax

    from medjax import config_lib, sharding, train_step
    from medjax.data import pipeline

    config = config_lib.load_config_file(args.config)
    config.data.batch_size = args.batch_size
    exp = train_step.build(config)  # The run's own model, optimizer, state and jitted step.
    loader = iter(pipeline.make_train_loader(config.data, seed=config.seed, **sharding.process_shard()))
    batches = [next(loader) for _ in range(args.steps + args.warmup)]
    state, times = exp.state, []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        state, step_metrics = exp.p_train(state, sharding.shard_batch(batch, exp.mesh), exp.seed_key)
        jax.block_until_ready(step_metrics)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if sharding.is_primary():
        print(json.dumps({"median_s": statistics.median(times), "devices": jax.device_count()}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_case(args: argparse.Namespace, devices: int, processes: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *sys.argv[1:], f"--worker={processes},{rank},{port}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(processes)
    ]
    outputs = [proc.communicate()[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        sys.exit(f"a worker failed ({devices} devices, {processes} processes)")
    return json.loads(outputs[0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/brain_mri.py:smoke")
    parser.add_argument("--batch_size", type=int, default=32, help="Global batch, the same in every case.")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    rows = []
    for name, devices, processes in CASES:
        result = _run_case(args, devices, processes)
        rows.append((name, result["median_s"]))
        print(f"{name}: {1000 * result['median_s']:.1f} ms per step", flush=True)
    base = rows[0][1]
    print(f"\n{args.config}, global batch {args.batch_size}, median of {args.steps} steps\n")
    print("| setting | ms per step | vs 1 device |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {1000 * seconds:.1f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
