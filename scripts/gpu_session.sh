#!/usr/bin/env bash
# One GPU session: build + check + time the kernels, then benchmark the runtime; logs and JSON
# go to $OUT (the device tool's output folder) or ./gpu-out.
#   STAGES="tests kernels bench" CONFIGS=tiny,base [VARIANTS=... PROFILE_VARIANTS=... TAG=_x] scripts/gpu_session.sh
# (stages: build = the kernel library only, for this GPU's architecture; tests = the tests/gpu suite;
#  kernels = build + time the fused kernel; conv = cuDNN vs the Triton conv per seed880m layer; bench)
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
STAGES=${STAGES:-"tests kernels bench"}
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
for stage in $STAGES; do
  case $stage in
    build) cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES="$ARCH" >/dev/null && cmake --build build -j >/dev/null ;;
    tests) python -m pytest tests/gpu -m gpu -q -rs 2>&1 | tee "$OUT/gpu_tests.log" ;;
    kernels) cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES="$ARCH" >/dev/null && cmake --build build -j >/dev/null
             python scripts/bench_temporal_attention.py --library build/libmirage_kernels.so \
               --json "$OUT/temporal_attention.json" 2>&1 | tee "$OUT/temporal_attention.log" ;;
    bench) python scripts/bench_runtime.py --configs "${CONFIGS-tiny,base}" ${VARIANTS:+--variants "$VARIANTS"} \
             --check-configs "${CHECK_CONFIGS:-}" --throughput-configs "${THROUGHPUT_CONFIGS:-}" \
             --throughput-variant "${THROUGHPUT_VARIANT:-runtime-fp16}" \
             --throughput-batches "${THROUGHPUT_BATCHES:-1,4,8,16}" --profile-variants "${PROFILE_VARIANTS:-}" --kernel-library build/libmirage_kernels.so \
             --json "$OUT/bench${TAG:-}.json" --markdown "$OUT/bench${TAG:-}.md" 2>&1 | tee "$OUT/bench${TAG:-}.log" ;;
    conv) python scripts/bench_conv.py --out "$OUT/conv.json" --tuned "$OUT/conv_tuned.json" 2>&1 | tee "$OUT/conv.log" ;;
    *) echo "unknown stage $stage (build, tests, kernels, conv, bench)"; exit 2 ;;
  esac
done
