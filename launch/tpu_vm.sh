#!/usr/bin/env bash
# medjax on a Cloud TPU VM slice (e.g. v5litepod-16: 4 hosts x 4 chips): the same command on every host.
#
#   launch/tpu_vm.sh my-tpu us-central2-b configs/covid_ct.py:synthetic /mnt/shared/runs/covid_ct \
#       --config.data.batch_size=128
#
# Arguments: TPU name, zone, --config value, --workdir (a path every host sees, e.g. a Filestore NFS or
# gcsfuse mount at the same place on each host), then any further medjax.launch flags. The repository
# must be at ~/medjax on every host with `pip install -r requirements.txt "jax[tpu]"` done (e.g. with
# `gcloud compute tpus tpu-vm ssh ... --worker=all --command="git clone ... && pip install ..."`).
# On a TPU VM JAX finds the coordinator, host count and rank itself (as `jax.distributed.initialize()`
# does), so no distributed flag is needed; every chip of the slice is one device of the ('data',) mesh.
set -euo pipefail
if [[ $# -lt 4 ]]; then
    echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [medjax.launch flags...]" >&2
    exit 2
fi
tpu="$1" zone="$2" config="$3" workdir="$4"
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="\
cd ~/medjax && python3 -m medjax.launch --config=$config --workdir=$workdir $*"
