#!/usr/bin/env bash
# Pretraining step on one accelerator, in one run (< 8 min on one GPU): MAE-B/16 at 224 px,
# bfloat16, plain MAE masking (random, no MIC), centralized (1 client, batch CLIENTS x BATCH)
# and federated (CLIENTS clients of BATCH) at the same total batch, img/s and MFU, and the
# PyTorch MAE peer (timm blocks, bf16 autocast) at the centralized batch. Writes a markdown
# table to $1, else $OUT/device_bench.md, else ./device_bench.md; the raw log beside it.
#   launch/device_bench.sh [/path/to/table.md]
# Smaller (e.g. on a CPU, to check the commands): CONFIG=configs/pretrain_fed.py:smoke BATCH=2
#   CLIENTS=2 STEPS=1 CHUNK=2 launch/device_bench.sh /tmp/table.md
set -euo pipefail
TABLE=${1:-${OUT:-.}/device_bench.md}
LOG=${TABLE%.md}.log
CONFIG=${CONFIG:-configs/pretrain_fed.py}  # the default preset is ViT-B/16 at 224, bfloat16
BATCH=${BATCH:-64} CLIENTS=${CLIENTS:-4} STEPS=${STEPS:-3} CHUNK=${CHUNK:-4}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
mkdir -p "$(dirname "$TABLE")"
cmd=(python -m ultrajax.bench pretrain --config="$CONFIG" --steps="$STEPS" --clients="$CLIENTS"
     --config.data.batch_size="$BATCH" --config.fed.chunk_steps="$CHUNK"
     --config.ultramim.tgm_mode=random --config.ultramim.mic=False)
timeout 460 "${cmd[@]}" 2>&1 | tee "$LOG"
machine=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
{
  echo "### $(date -u +%Y-%m-%d), ${machine:-$(python -c 'import jax; print(jax.devices()[0].device_kind)')}"
  echo
  echo '```'
  echo "${cmd[*]}"
  echo '```'
  echo
  echo "| mode | clients | batch | img/s | ms/step | ms/round+ | TFLOP/s/dev | MFU | compile s |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  awk '/^(central|federated) /{printf "| %s |", $1; for (i = 2; i <= NF; i++) printf " %s |", $i; print ""}
       /^pytorch MAE /{printf "| PyTorch MAE (timm) | %s | %s | %s | %s | - | - | - | - |\n", $3, $4, $5, $6}' "$LOG"
  echo
  grep '^ratio ' "$LOG" | sed 's/^/- /'
  grep '^PyTorch peer skipped' "$LOG" | sed 's/^/- /' || true
} > "$TABLE"
echo "wrote $TABLE"
