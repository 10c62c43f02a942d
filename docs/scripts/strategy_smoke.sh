#!/bin/bash
# Job-level smoke of federated pretraining with every strategy that applies to it (issue 16), and
# the simulated attack of issue 20: client 3 of 5 sends its update scaled by 1e6
# (config.fed.attack, SIMULATION ONLY) under FedAvg and under the robust strategies.
#
#   bash docs/scripts/strategy_smoke.sh        # from the repository root, venv active
#
# Environment: OUT (/tmp/strategy_smoke), NICE (10), ONLY (a bash regex of run names; default
# all). Runs one at a time: configs/pretrain_fed.py:smoke with 5 phantom clients (16 images
# each plus their SMAT partners, batch 4: 8 local steps per round, clients one after another on
# one lane), 3 rounds, evaluators off. Each run compiles its own round program: 1.5-4 minutes
# per run on the shared 2-core machine (about 40 s of CPU). Then prints one table row per run
# from its metrics.jsonl (docs/federated.md, docs/privacy.md).
set -uo pipefail
OUT=${OUT:-/tmp/strategy_smoke}
NICE=${NICE:-10}
ONLY=${ONLY:-.}
COMMON=(
  --config=configs/pretrain_fed.py:smoke --config.data.num_clients=5 --config.fed.num_rounds=3
  --config.evals.linear_probe.every_rounds=0 --config.evals.knn.every_rounds=0
  --config.image_every_rounds=1000 --config.ckpt_every_rounds=1000 --config.fed.lanes=1
)
ATTACK=(--config.fed.attack=scale:1e6 --config.fed.attack_clients=3)

run() {  # run NAME ARGS...: a fresh workdir $OUT/NAME with log.txt, rc and the job's outputs
  local name=$1
  shift
  [[ $name =~ $ONLY ]] || return 0
  rm -rf "${OUT:?}/$name"
  mkdir -p "$OUT/$name"
  echo "$*" > "$OUT/$name/args"
  nice -n "$NICE" python -m ultrajax.main "${COMMON[@]}" --workdir="$OUT/$name" "$@" \
    > "$OUT/$name/log.txt" 2>&1
  echo $? > "$OUT/$name/rc"
  echo "$name: exit $(cat "$OUT/$name/rc")"
}

# (a) every strategy that applies to pretraining (splitavg needs a split model; local, central,
# fedavg_uniform and keep_local are FedAvg's arithmetic with other weights or kept leaves, as
# fedbn), partial participation, and example-level DP-SGD under FedAvg.
run fedavg_dp_sgd --config.fed.strategy=fedavg --config.dp_sgd.noise_multiplier=1.0
for s in fedavg fedprox fedadam fedyogi fedadagrad scaffold fedbn personalized dp_fedavg secagg \
  dp_secagg median trimmed_mean krum multi_krum norm_bound fedavg_screened; do
  run "$s" --config.fed.strategy=$s
done
run fedavg_3_of_5 --config.fed.strategy=fedavg --config.fed.clients_per_round=3

# (b) client 3 of 5 sends x + 1e6 (y_3 - x) every round.
for s in fedavg median trimmed_mean krum multi_krum norm_bound fedavg_screened; do
  run "attack_$s" --config.fed.strategy=$s "${ATTACK[@]}"
done
# The rules alone (screen off); trimmed_mean with beta = 0.2 cuts one of five at each end.
run attack_median_noscreen --config.fed.strategy=median "${ATTACK[@]}" \
  --config.fed.strategy_options=screen_factor=0.0
run attack_trimmed_mean_noscreen --config.fed.strategy=trimmed_mean "${ATTACK[@]}" \
  "--config.fed.strategy_options=beta=0.2, screen_factor=0.0"

python - "$OUT" <<'EOF'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
print("| run | exit | loss round 1 | final loss (round) | notes |\n|---|---|---|---|---|")
for d in sorted(p for p in out.iterdir() if (p / "rc").exists()):
  rows = []
  if (d / "metrics.jsonl").exists():
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
  rows = [r for r in rows if "loss" in r]
  notes = []
  if rows:
    last = rows[-1]
    for key in ("dp/epsilon", "dp_sgd/epsilon", "screen/excluded_total"):
      if key in last:
        notes.append(f"{key} {last[key]:.4g}")
  rc = int((d / "rc").read_text())
  if rc:
    errors = [x for x in (d / "log.txt").read_text().splitlines() if "Error" in x or "error" in x]
    notes.append((errors[-1] if errors else "failed")[-160:].replace("|", "/"))
  first = f"{rows[0]['loss']:.4g}" if rows else "-"
  final = f"{rows[-1]['loss']:.4g} ({int(rows[-1]['round'])})" if rows else "-"
  print(f"| {d.name} | {rc} | {first} | {final} | {'; '.join(notes)} |")
EOF
