#!/usr/bin/env bash
# Trains the two bundled checkpoints (checkpoints/tiny, checkpoints/tiny-v2v) side by side on one GPU.
# This is the recorded command behind them: bash scripts/train_bundled.sh OUT_DIR [STEPS]
# After it, copy OUT_DIR/<name>/{config.json,model.safetensors} into checkpoints/<name>/.
set -euo pipefail
out=${1:-runs}
steps=${2:-8000}
py=${PYTHON:-python3}
common=(--config tiny --steps "$steps" --batch-size 128 --lr 2e-3 --precision bf16 --device auto --workers 6)
$py -m mirage.train.cli "${common[@]}" --task generate --out "$out/tiny" > "$out/tiny.log" 2>&1 &
gen=$!
$py -m mirage.train.cli "${common[@]}" --task v2v --out "$out/tiny-v2v" > "$out/tiny-v2v.log" 2>&1 &
v2v=$!
wait $gen
wait $v2v
tail -c 400 "$out/tiny.log" "$out/tiny-v2v.log"
