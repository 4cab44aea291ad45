#!/usr/bin/env bash
# medjax on one machine with several GPUs: one process drives them all (JAX's recommended layout for a
# single host), so this is the ordinary command; every visible GPU becomes a device of the ('data',) mesh.
#
#   pip install -r requirements.txt "jax[cuda12]"
#   launch/multi_gpu.sh --config=configs/chest_xray.py --config.data.batch_size=128
#   CUDA_VISIBLE_DEVICES=0,1 launch/multi_gpu.sh --config=configs/covid_ct.py:synthetic   # two of them
#
# data.batch_size is the global batch (split over the GPUs) and must be divisible by their number.
# Several such machines: launch/slurm.sbatch or launch/k8s_indexed_job.yaml (one process per machine).
set -euo pipefail
python -c 'import jax; print(f"{jax.device_count()} devices: {jax.devices()}")'
exec python -m medjax.launch "$@"
