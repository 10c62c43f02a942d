#!/usr/bin/env bash
# Runs an ultrajax job on every worker of a Cloud TPU VM slice. JAX finds the other hosts by
# itself on TPU VMs, so each worker runs the same command.
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/pretrain_fed.py gs://bucket/workdir [--config.x=y ...]
#
# The repository is copied to every worker and installed there first (idempotent).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [extra flags]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REPO=$(cd "$(dirname "$0")/.." && pwd)

gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all "$REPO" "$TPU_NAME":~/ultrajax
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  cd ~/ultrajax
  python3 -m venv ~/.venv-ultrajax && . ~/.venv-ultrajax/bin/activate
  pip install -q -e . 'jax[tpu]'
  python -m ultrajax.main --config=$CONFIG --workdir=$WORKDIR $*
"
