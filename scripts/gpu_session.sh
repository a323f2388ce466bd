#!/usr/bin/env bash
# One GPU session: build + check + time the kernels, then benchmark the runtime; logs and JSON
# go to $OUT (the device tool's output folder) or ./gpu-out.
#   STAGES="kernels bench" CONFIGS=tiny,base [VARIANTS=... PROFILE_VARIANTS=... TAG=_x] scripts/gpu_session.sh
# (stages: build = the kernel library only; kernels = build + check + time it; bench; cuda)
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
STAGES=${STAGES:-"kernels bench"}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
for stage in $STAGES; do
  case $stage in
    build) cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null && cmake --build build -j >/dev/null ;;
    kernels) python scripts/check_kernels.py --build build --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" ;;
    bench) python scripts/bench_runtime.py --configs "${CONFIGS-tiny,base}" ${VARIANTS:+--variants "$VARIANTS"} \
             --check-configs "${CHECK_CONFIGS:-}" --throughput-configs "${THROUGHPUT_CONFIGS:-}" \
             --throughput-variant "${THROUGHPUT_VARIANT:-runtime-fp16}" \
             --throughput-batches "${THROUGHPUT_BATCHES:-1,4,8,16}" --profile-variants "${PROFILE_VARIANTS:-}" --kernel-library build/libmirage_kernels.so \
             --json "$OUT/bench${TAG:-}.json" --markdown "$OUT/bench${TAG:-}.md" 2>&1 | tee "$OUT/bench${TAG:-}.log" ;;
    cuda) python scripts/check_cuda_runtime.py --json "$OUT/cuda_runtime.json" 2>&1 | tee "$OUT/cuda_runtime.log" ;;
    *) echo "unknown stage $stage (build, kernels, bench, cuda)"; exit 2 ;;
  esac
done
