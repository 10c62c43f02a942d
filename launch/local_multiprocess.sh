#!/usr/bin/env bash
# Simulates a multi-host run on one machine: N CPU processes, each with D fake devices,
# joined by jax.distributed (CPU collectives over gloo). Process 0 writes logs.
#   launch/local_multiprocess.sh 2 configs/pretrain_fed.py:smoke /tmp/mp_workdir [flags]
set -euo pipefail
N=$1 CONFIG=$2 WORKDIR=$3
shift 3
PORT=${PORT:-12355}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
# The caller's XLA flags are kept, but for the device count, which this script sets.
XLA_FLAGS="$(sed 's/--xla_force_host_platform_device_count=[0-9]*//' <<< "${XLA_FLAGS:-}")"
export XLA_FLAGS="${XLA_FLAGS} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
pids=()
for ((i = 0; i < N; i++)); do
  python -m ultrajax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator="localhost:$PORT" --num_processes="$N" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
