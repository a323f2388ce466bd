#!/usr/bin/env bash
# One GPU session: build + check + time the kernels, then benchmark the runtime; logs and JSON
# go to $OUT (the device tool's output folder) or ./gpu-out.
#   CONFIGS=tiny,base VARIANTS=... STAGES="kernels bench" scripts/gpu_session.sh
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
STAGES=${STAGES:-"kernels bench"}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
for stage in $STAGES; do
  case $stage in
    kernels) python scripts/check_kernels.py --build build --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" ;;
    bench) python scripts/bench_runtime.py --configs "${CONFIGS:-tiny,base}" ${VARIANTS:+--variants "$VARIANTS"} \
             --check-configs "${CHECK_CONFIGS:-}" --throughput-configs "${THROUGHPUT_CONFIGS:-}" \
             --throughput-variant "${THROUGHPUT_VARIANT:-runtime-fp16}" --kernel-library build/libmirage_kernels.so \
             --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" ;;
    cuda) python scripts/check_cuda_runtime.py --json "$OUT/cuda_runtime.json" 2>&1 | tee "$OUT/cuda_runtime.log" ;;
    *) echo "unknown stage $stage (kernels, bench, cuda)"; exit 2 ;;
  esac
done
