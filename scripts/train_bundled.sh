#!/usr/bin/env bash
# Trains the bundled checkpoints on one GPU: the recorded command behind checkpoints/tiny and
# checkpoints/tiny-v2v.   bash scripts/train_bundled.sh OUT_DIR [STEPS] [TASKS]
# Then copy OUT_DIR/<name>/{config.json,model.safetensors} into checkpoints/<name>/.
set -euo pipefail
out=${1:-runs}
steps=${2:-6000}
tasks=${3:-"generate v2v"}
py=${PYTHON:-python3}
mkdir -p "$out"
pids=()
for task in $tasks; do
  name=tiny; [ "$task" = v2v ] && name=tiny-v2v
  $py -m mirage.cli.train --config tiny --task "$task" --steps "$steps" --batch-size 128 --lr 2e-3 \
      --precision bf16 --device auto --workers 7 --out "$out/$name" > "$out/$name.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for f in "$out"/*.log; do tail -c 300 "$f"; echo; done
