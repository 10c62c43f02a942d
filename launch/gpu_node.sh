#!/usr/bin/env bash
# Runs an ultrajax job on one GPU node (all its GPUs form the mesh).
#   launch/gpu_node.sh configs/pretrain_fed.py /scratch/workdir [--config.x=y ...]
# Under SLURM with several nodes, launch this once per node (srun); JAX reads the SLURM
# environment and ultrajax.main calls jax.distributed.initialize() by itself.
set -euo pipefail
CONFIG=$1 WORKDIR=$2
shift 2
# Let XLA use most of the GPU memory up front and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m ultrajax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
