#!/usr/bin/env bash
# Issue 15 on the GPU machine: a 512x512 model on ae-taesd's latents (TASK=v2v, video-to-video, or
# TASK=generate), trained with DDP over every GPU of the machine for TRAIN_SECONDS, then scored by
# mirage-quality over FRAMES frames on held-out camera-like clips (and, for v2v, photo pans), with
# example frames (input | output | truth).
#
#   bash scripts/train_latent_gpu.sh                  # results in $OUT (the device tool's folder) or ./latent-out
#   # two models at once on a two-GPU machine, one GPU each:
#   CUDA_VISIBLE_DEVICES=0 OUT=$OUT/v2v bash scripts/train_latent_gpu.sh & \
#   CUDA_VISIBLE_DEVICES=1 OUT=$OUT/gen RUN=runs/latent-gen TASK=generate STREAMS=2 bash scripts/train_latent_gpu.sh
#   CONFIG=tiny-64 STEPS=4 BATCH=2 FRAMES=6 WINDOW=3 LATENT_CACHE=4 TRAIN_SECONDS=120 DEVICE=cpu bash scripts/train_latent_gpu.sh   # CPU smoke test
#
# $OUT gets each result as soon as it exists, so a command cut by a time limit keeps what was done:
# train.log, tables.txt (each quality table appended as it is done), then reports.tgz (the quality
# JSONs, the example PNGs, the GPU's name) — three files, so that two runs fit the eight files the
# device tool brings back. The checkpoint stays in $RUN (base-512 is ~400 MB: too large to bundle).
set -euo pipefail
OUT=${OUT:-latent-out}
RUN=${RUN:-runs/latent-v2v}
TASK=${TASK:-v2v}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
W=$(mktemp -d /tmp/latent.XXXX)  # reports and example PNGs, packed at the end
if [ "$DEVICE" = cuda ]; then
  # every GPU the process sees (nvidia-smi ignores CUDA_VISIBLE_DEVICES)
  GPUS=${GPUS:-$($PY -c "import torch; print(torch.cuda.device_count())")}
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$W/gpu.txt"
else
  GPUS=1
fi
WORKERS=${WORKERS:-$(( ($(nproc) - 2) / GPUS ))}  # detailed 512^2 clips are made on the CPU
# Without a cache the CPU making clips bounded two H100s at 1.6 steps/s; LATENT_CACHE clips per GPU are made and
# encoded once (512^2, base-512: 640 KB of latents a clip on the GPU), then every step draws from them.
# The run stops by itself at STEPS, or at TRAIN_SECONDS with a saved checkpoint (SIGTERM to the group).
timeout "${TRAIN_SECONDS:-330}" $PY -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m mirage.cli.train \
  --config "${CONFIG:-base-512}" --task "$TASK" --data detailed --batch-size "${BATCH:-16}" --steps "${STEPS:-2000}" \
  --lr "${LR:-5e-4}" --precision bf16 --workers "$WORKERS" --device "$DEVICE" --save-minutes 2 --out "$RUN" \
  --latent-cache "${LATENT_CACHE:-4000}" \
  > "$OUT/train.log" 2>&1 || echo "train: exit $?" >> "$OUT/train.log"
tail -c 2000 "$OUT/train.log" | tr '\r' '\n' | tail -n 4
quality() {  # DATA: one report; its table is appended to tables.txt as soon as it is done
  OMP_NUM_THREADS=4 $PY -m mirage.cli.quality "$RUN" --frames "${FRAMES:-500}" --window "${WINDOW:-50}" \
    --streams "${STREAMS:-1}" --data "$1" --device "$DEVICE" --examples "$W/examples-$1" \
    --json "$W/q-$1.json" > "$W/q-$1.txt" 2>&1 || echo "quality $1: exit $?" >> "$W/q-$1.txt"
  { echo "== $TASK on $1"; cat "$W/q-$1.txt"; } >> "$OUT/tables.txt"
}
DATASETS=${DATASETS:-$([ "$TASK" = v2v ] && echo "detailed photos" || echo detailed)}  # photo pans: inputs only
for data in $DATASETS; do quality "$data" & done  # in parallel: the metrics run on the CPU
wait
cat "$OUT/tables.txt"
tar czf "$OUT/reports.tgz" -C "$W" .
