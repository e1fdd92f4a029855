#!/usr/bin/env bash
# Run the embedded default for several seeds and print each run's test accuracy and inversion curve.
# bash scripts/tiny_seeds.sh [seeds...]   (default: 0 1 2); runs land in runs/seeds/seed<N>/<timestamp>
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
for seed in "${@:-0 1 2}"; do
  for s in $seed; do
    start=$(date +%s)
    .venv/bin/corrpo fit --config configs/tiny.yaml --seed_everything "$s" --model.seed "$s" --data.seed "$s" \
      --data.arithmetic.seed "$s" --trainer.default_root_dir "runs/seeds/seed$s" > "/tmp/corrpo_seed$s.log" 2>&1
    echo "seed $s: $(( $(date +%s) - start )) s wall"
    grep "\[corrpo\]" "/tmp/corrpo_seed$s.log" | grep -v exported
  done
done
