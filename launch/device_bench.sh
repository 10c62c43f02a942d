#!/usr/bin/env bash
# Pretraining step on one accelerator, in one run (< 8 min on one GPU: each step has its own
# timeout, 150 + 150 + 80 + 90 s; an H200 took 118, 104, ~70 and 28 s): MAE-B/16 at 224 px,
# bfloat16, plain MAE masking (random, no MIC), centralized (1 client, batch CLIENTS x BATCH)
# and federated (CLIENTS clients of BATCH) at the same total batch, each in its own process
# (each compiles its chunk for about a minute), img/s and MFU, and the PyTorch MAE peer (timm
# blocks, bf16 autocast) at the centralized batch; with PLAN=1 also `bench plan` of the paper
# preset compiled for this device (XLA's memory analysis on the accelerator itself, nothing
# allocated; it did not compile within 100 s on an H200, and `bench plan --devices=N` on a CPU
# gives the same layout's figures); `bench pipeline`
# (host img/s at 224 px, ultrajax vs the official MAE DataLoader, at PIPELINE_WORKERS); `bench
# sam` (SAM_VARIANT's image encoder img/s at SAM_BATCH images of 1024 px and decoder ms per
# batch of 16 prompts, bf16, beside segment_anything on the same GPU under bf16 autocast).
# The pretraining step and SAM's encoder are then traced (jax.profiler): their busiest XLA ops go
# into the table and the perfetto traces beside it (${TABLE%.md}_trace_<mode|sam>.json.gz,
# ui.perfetto.dev).
# If the pretraining step or `bench sam` prints no figures (cuDNN's attention failing past
# JAX's checks), it runs again with the einsum attention inside the same 230 or 90 s (`step`
# below), and the table says so.
# Writes markdown tables to $1, else $OUT/device_bench.md, else ./device_bench.md; raw logs
# beside it.
#   launch/device_bench.sh [/path/to/table.md]
# Smaller (e.g. on a CPU, to check the commands): CONFIG=configs/pretrain_fed.py:smoke BATCH=2
#   CLIENTS=2 STEPS=1 CHUNK=2 PLAN_CONFIG=configs/pretrain_fed.py:smoke PIPELINE_WORKERS=0,1
#   SAM_VARIANT=tiny SAM_SIZE=128 SAM_BATCH=2 launch/device_bench.sh /tmp/table.md
# On a lent machine without grain etc., carry the .whl/ of launch/device_wheels.sh: installed
# into /tmp/site first. PYTHON: the interpreter (default python3).
set -euo pipefail
PY=${PYTHON:-python3}
needs='import grain, ml_collections, clu, segment_anything, dp_accounting, pydicom, pycocotools'
if ! "$PY" -c "$needs" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
TABLE=${1:-${OUT:-.}/device_bench.md}
LOG=${TABLE%.md}.log
CONFIG=${CONFIG:-configs/pretrain_fed.py}  # the default preset is ViT-B/16 at 224, bfloat16
BATCH=${BATCH:-64} CLIENTS=${CLIENTS:-4} STEPS=${STEPS:-3} CHUNK=${CHUNK:-4} ROUNDS=${ROUNDS:-2}
PIPELINE_WORKERS=${PIPELINE_WORKERS:-1,2,4} PLAN_CONFIG=${PLAN_CONFIG:-configs/pretrain_fed.py}
SAM_VARIANT=${SAM_VARIANT:-vit_b} SAM_SIZE=${SAM_SIZE:-1024} SAM_BATCH=${SAM_BATCH:-8}
# Half the GPU for XLA: PyTorch shares it (the peer's process beside `bench pretrain`,
# segment_anything inside `bench sam`). At 0.9 XLA's 126 GiB reservation failed beside the
# peer and segment_anything ran out of memory (H200, 2026-12-04).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
mkdir -p "$(dirname "$TABLE")"
cmd=("$PY" -m ultrajax.bench pretrain --config="$CONFIG" --steps="$STEPS" --clients="$CLIENTS" --rounds="$ROUNDS"
     --config.data.batch_size="$BATCH" --config.fed.chunk_steps="$CHUNK"
     --config.ultramim.tgm_mode=random --config.ultramim.mic=False
     --profile_dir=/tmp/ultrajax_device_profile)
FED_LOG=${TABLE%.md}_federated.log PLAN_LOG=${TABLE%.md}_plan.log
PIPE_LOG=${TABLE%.md}_pipeline.log SAM_LOG=${TABLE%.md}_sam.log
# step LOG SECONDS PATTERN FLAG CMD...: runs CMD within SECONDS, its output into LOG. A step that
# runs out of time leaves what it printed; the others still run. cuDNN's attention can fail where
# JAX's trace-time checks let it through (at compile or run time, on a jax/cuDNN pair not seen
# here): if LOG then has no line matching PATTERN and a quarter of SECONDS is left, CMD runs
# again with FLAG (the einsum attention) in the time left, so the run still gives its figures.
# RETRIED: the first run's last error line when it did so, else empty.
step() {
  local log=$1 budget=$2 pattern=$3 flag=$4 start=$SECONDS
  shift 4
  RETRIED=""
  timeout "$budget" "$@" 2>&1 | tee "$log" || true
  if ! grep -q "$pattern" "$log" && [ $((SECONDS - start)) -lt $((budget * 3 / 4)) ]; then
    RETRIED=$(grep -E '^[A-Za-z_.]*(Error|Exception)\b' "$log" | tail -1 | cut -c1-200)
    RETRIED=${RETRIED:-no error line}
    timeout $((budget - SECONDS + start)) "$@" "$flag" 2>&1 | tee -a "$log" || true
  fi
}
step "$LOG" 150 '^central ' --config.model.attention_impl=einsum "${cmd[@]}" --pretrain_modes=central
retried=$RETRIED
step "$FED_LOG" 150 '^federated ' --config.model.attention_impl=einsum "${cmd[@]}" \
  --pretrain_modes=federated --notorch_peer
fed_retried=$RETRIED
for mode in central federated; do  # the newest trace of each mode, beside the table
  trace=$(ls -t /tmp/ultrajax_device_profile/$mode/plugins/profile/*/perfetto_trace.json.gz 2> /dev/null | head -1 || true)
  if [ -n "$trace" ]; then cp "$trace" "${TABLE%.md}_trace_$mode.json.gz"; fi
done
plan=("$PY" -m ultrajax.bench plan --config="$PLAN_CONFIG")
if [ "${PLAN:-0}" = 1 ]; then timeout 100 "${plan[@]}" 2>&1 | tee "$PLAN_LOG" || true; fi
pipe=("$PY" -m ultrajax.bench pipeline --pipeline_workers="$PIPELINE_WORKERS")
timeout 80 "${pipe[@]}" 2>&1 | tee "$PIPE_LOG" || true
sam=("$PY" -m ultrajax.bench sam --sam_variant="$SAM_VARIANT" --sam_image_size="$SAM_SIZE"
     --sam_batch="$SAM_BATCH" --sam_dtype=bfloat16 --steps=5 --profile_dir=/tmp/ultrajax_device_profile)
step "$SAM_LOG" 90 '^ultrajax ' --sam_attention_impl=einsum "${sam[@]}"
sam_retried=$RETRIED
trace=$(ls -t /tmp/ultrajax_device_profile/sam/plugins/profile/*/perfetto_trace.json.gz 2> /dev/null | head -1 || true)
if [ -n "$trace" ]; then cp "$trace" "${TABLE%.md}_trace_sam.json.gz"; fi
machine=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
versions=$("$PY" -c 'import importlib.metadata as m
found = []
for name in ("jax", "jaxlib", "flax", "torch"):
  try:
    found.append(f"{name} {m.version(name)}")
  except m.PackageNotFoundError:
    pass
print(", ".join(found))' 2> /dev/null || true)
{
  echo "### $(date -u +%Y-%m-%d), ${machine:-$("$PY" -c 'import jax; print(jax.devices()[0].device_kind)')}"
  echo
  echo "${versions:-versions unknown}; $(nproc) host cores"
  echo
  echo '```'
  echo "${cmd[*]}"
  echo '```'
  echo
  echo "| mode | clients | batch | img/s | ms/step | ms/round+ | TFLOP/s/dev | MFU | compile s | CPU ms/img |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  awk '/^(central|federated) /{printf "| %s |", $1; for (i = 2; i <= NF; i++) printf " %s |", $i; print ""}
       /^pytorch MAE /{printf "| PyTorch MAE (timm) | %s | %s | %s | %s | - | - | - | - | - |\n", $3, $4, $5, $6}' "$LOG" "$FED_LOG"
  echo
  awk '/^central /{c = $4} /^federated /{f = $4}
       END {if (c && f) printf "- ratio federated / central img/s at the same total batch: %.2f\n", f / c}' "$LOG" "$FED_LOG"
  grep -h '^ratio ' "$LOG" | sed 's/^/- /' || true
  grep -h '^PyTorch peer skipped' "$LOG" | sed 's/^/- /' || true
  grep -h '^model FLOPs by' "$LOG" "$FED_LOG" | sed 's/^/- /' || true
  grep -h -m1 -o "cuDNN attention refused.*" "$LOG" "$FED_LOG" | head -1 | sed 's/^/- /' || true
  if [ -n "$retried" ]; then
    echo "- central: the first run gave no figures (${retried}); these are from a second run with attention_impl=einsum"
  fi
  if [ -n "$fed_retried" ]; then
    echo "- federated: the first run gave no figures (${fed_retried}); these are from a second run with attention_impl=einsum"
  fi
  echo
  echo "#### Where the pretraining step's time goes (jax.profiler; traces in $(basename "${TABLE%.md}")_trace_<mode>.json.gz)"
  echo
  echo '```'
  grep -h '^profile ' "$LOG" "$FED_LOG" || echo "no profile printed"
  echo '```'
  echo
  if [ "${PLAN:-0}" = 1 ]; then
    echo "#### Memory and FLOPs of \`${plan[*]}\` (XLA on this device; compiled, not run)"
    echo
    echo '```'
    grep -E '^(# plan|parameters|  |XLA memory|compile|to fit|model FLOPs|time per round)' "$PLAN_LOG" || true
    echo '```'
    echo
  fi
  echo "#### Host input pipeline: \`${pipe[*]}\` ($(nproc) cores)"
  echo
  echo "| pipeline | workers | img/s | img/s per core | img/CPU-s |"
  echo "| --- | --- | --- | --- | --- |"
  awk '/^(ultrajax|official MAE), /{n = NF; name = $1; for (i = 2; i <= n - 4; i++) name = name " " $i
       printf "| %s | %s | %s | %s | %s |\n", name, $(n - 3), $(n - 2), $(n - 1), $n}' "$PIPE_LOG"
  echo
  echo "#### SAM: \`${sam[*]}\`"
  echo
  echo '```'
  grep -E '^(# SAM|implementation|ultrajax |segment_anything |speed-up)' "$SAM_LOG" || true
  echo '```'
  echo
  echo "Where the SAM encoder's time goes (jax.profiler; trace in $(basename "${TABLE%.md}")_trace_sam.json.gz):"
  echo
  echo '```'
  grep -h '^profile sam' "$SAM_LOG" || echo "no profile printed"
  echo '```'
  if [ -n "$sam_retried" ]; then
    echo
    echo "- the first run gave no figures (${sam_retried}); these are from a second run with --sam_attention_impl=einsum"
  fi
} > "$TABLE"
echo "wrote $TABLE"
