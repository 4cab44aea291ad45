#!/usr/bin/env bash
# N medjax processes on this machine joined through 127.0.0.1 (CPU; what the tests of
# tests/test_distributed.py do), e.g. to try a multi-process run before a cluster:
#
#   N=2 launch/local_processes.sh --config=configs/covid_ct.py:smoke --workdir=/tmp/two_processes
#
# Each process runs on its own CPU device(s) (XLA_FLAGS=--xla_force_host_platform_device_count=K gives
# each K); they exchange gradients over gloo. If one dies, JAX stops the others within
# --heartbeat_timeout_seconds; running the same command again resumes from the latest checkpoint.
set -uo pipefail
n="${N:-2}"
port="${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
pids=()
for ((i = 0; i < n; i++)); do
    python -m medjax.launch "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
        --process_id="$i" --heartbeat_timeout_seconds="${HEARTBEAT:-20}" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
done
exit "$status"
