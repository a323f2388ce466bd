#!/usr/bin/env bash
# Train the full-width `taesd` autoencoder (TAESD's published layout, ~1.2M parameters per side) on
# the GPU machine, then measure its reconstruction at 256^2 and 512^2; fits one 10-minute device call.
#
#   on this machine, once (the GPU machine has no package index; same Python version as there):
#     pip download diffusers==0.42.1 scikit-image==0.26.0 -d .whl
#   on the GPU machine (carry .whl and, to continue a run, runs/ae-taesd):
#     bash scripts/train_autoencoder_gpu.sh            # STEPS=8000 TRAIN_SECONDS=480 by default
#
# Training stops after TRAIN_SECONDS (a checkpoint is written every 500 steps, so a cut run keeps
# its last one); running the script again continues from runs/ae-taesd's weights. Results: $OUT
# (the device tool's output folder) or ./gpu-out: the checkpoint, train.log, eval JSON and PNGs.
set -euo pipefail
OUT=${OUT:-gpu-out}
RUN=${RUN:-runs/ae-taesd}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
$PY -c "import diffusers, skimage" 2>/dev/null || $PY -m pip install -q --no-index --find-links .whl diffusers scikit-image
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# 256^2 crops: every MS-SSIM scale fits (>= 176 px) and 14 workers keep up with making detailed frames
timeout "${TRAIN_SECONDS:-480}" $PY -m mirage.cli.train --stage autoencoder --ae-config taesd --data detailed --crop 256 \
  --batch-size 32 --steps "${STEPS:-8000}" --lr 1e-3 --precision bf16 --ema-decay 0.999 --workers 14 \
  --device cuda --seed 0 --out "$RUN" 2>&1 | tee "$OUT/train.log" || true
$PY scripts/eval_autoencoder.py "$RUN" --sizes 256 512 --device cuda --threads 8 \
  --json "$OUT/ae-taesd-h100.json" --png "$OUT/png" 2>&1 | tee "$OUT/eval.log"
cp -r "$RUN" "$OUT/ae-taesd"
