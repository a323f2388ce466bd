#!/usr/bin/env bash
# One GPU session: build + check + time the kernels, then benchmark the runtime; logs and JSON
# go to $OUT (the device tool's output folder) or ./gpu-out.
#   STAGES="tests kernels bench" CONFIGS=tiny,base [VARIANTS=... PROFILE_VARIANTS=... STEPS=4 TAG=_x] scripts/gpu_session.sh
#   STAGES="servetests serve" SERVE_CASES="base:16 base:16:churn base-512:8 base-512:8:cpu-jpeg" scripts/gpu_session.sh
#   STAGES="run" [RUN_CONFIGS="base-512 base" RUN_FRAMES=300] scripts/gpu_session.sh
#   STAGES="dittests anchor dit" SELF_FORCING=.anchor/Self-Forcing [DIT_CONFIG=wan-1.3b DIT_BLOCKS=7 DIT_MODES=...] scripts/gpu_session.sh
# (stages: build = the kernel library only, for this GPU's architecture; tests = the tests/gpu suite;
#  kernels = build + time the fused kernel; conv = cuDNN vs the Triton conv per seed880m layer; bench;
#  servetests = the serving and runtime GPU tests; serve = bench_serve, one server per CONFIG:STREAMS[:churn]
#  case, each under its own SERVE_LIMIT seconds so that a slow case cannot cost the others their JSON;
#  dittests = the DiT's GPU tests; anchor = Self-Forcing's own code on the same clip (a checkout in $SELF_FORCING,
#  never committed); dit = bench_dit for DIT_CONFIG; run = mirage-run --fast as a user runs it (pipelined), per
#  RUN_CONFIGS config with random weights, on an mp4 of its size and on --input synthetic, beside bench_runtime's
#  frame graph (runtime-fast, compile-fp16) in the same session: issue 30's "mirage-run >= 0.85x the graph's FPS")
set -euo pipefail
# the repository is the package `mirage` (package-dir mapping); without an install, a symlink named mirage on PYTHONPATH
if ! python -c "import mirage" 2>/dev/null; then mkdir -p /tmp/mirage-pkg && ln -sfn "$PWD" /tmp/mirage-pkg/mirage && export PYTHONPATH=/tmp/mirage-pkg${PYTHONPATH:+:$PYTHONPATH}; fi
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
    bench) python scripts/bench_runtime.py --configs "${CONFIGS-tiny,base}" ${VARIANTS:+--variants "$VARIANTS"} ${STEPS:+--steps "$STEPS"} \
             --check-configs "${CHECK_CONFIGS:-}" --throughput-configs "${THROUGHPUT_CONFIGS:-}" \
             --throughput-variant "${THROUGHPUT_VARIANT:-runtime-fp16}" \
             --throughput-batches "${THROUGHPUT_BATCHES:-1,4,8,16}" --profile-variants "${PROFILE_VARIANTS:-}" --kernel-library build/libmirage_kernels.so \
             --json "$OUT/bench${TAG:-}.json" --markdown "$OUT/bench${TAG:-}.md" 2>&1 | tee "$OUT/bench${TAG:-}.log" ;;
    servetests) python -m pytest -q -rs tests/gpu/test_gpu_serve.py tests/gpu/test_gpu_cuda_runtime.py \
                  tests/gpu/test_gpu_torch_runtime.py 2>&1 | tee "$OUT/serve_tests.log" || echo "servetests: failures" ;;
    serve) for case in ${SERVE_CASES:-base:16}; do
             IFS=: read -r cfg n mode <<< "$case"  # mode: churn (--churn), ray (--ray: through Ray Serve) or cpu-jpeg
             timeout "${SERVE_LIMIT:-300}" python scripts/bench_serve.py --random "$cfg" --device cuda --fast --counts "$n" \
               --keep-going --startup-s 200 ${mode:+--$mode} --json "$OUT/serve_${cfg}_${n}${mode:+_$mode}.json" \
               2>&1 | tee "$OUT/serve_${cfg}_${n}${mode:+_$mode}.log" || echo "serve $case: exit $?"
           done ;;
    run) python scripts/bench_runtime.py --configs "$(echo ${RUN_CONFIGS:-base-512 base} | tr ' ' ,)" --task v2v \
           --variants runtime-fast,compile-fp16 --check-configs "" --json "$OUT/run_graph.json" 2>&1 | tee "$OUT/run_graph.log"
         for cfg in ${RUN_CONFIGS:-base-512 base}; do
           ckpt=$(python -c "import sys; from pathlib import Path; sys.path.insert(0, 'scripts'); from bench_serve import \
random_checkpoint; print(random_checkpoint('$cfg', Path('/tmp/mirage-run-random')))" | tail -1)
           px=$(python -c "from mirage.core.config import get_config; print(get_config('$cfg', 'v2v').pixels)")
           python -c "from mirage.core.synthetic import SyntheticVideo; from mirage.core.video_io import write_video; \
v = SyntheticVideo($px, seed=1); write_video('/tmp/mirage-run-$px.mp4', (v.clip(0, 1, start=n)[0] for n in range(${RUN_FRAMES:-300})), 30, 1)"
           for src in mp4 synthetic; do
             input=$([ $src = mp4 ] && echo /tmp/mirage-run-$px.mp4 || echo synthetic)
             python -m mirage.cli.run "$ckpt" --device cuda --fast --input "$input" --frames "${RUN_FRAMES:-300}" \
               --output "/tmp/mirage-run-$cfg-$src.mp4" --json "$OUT/run_${cfg}_$src.json" 2>&1 | tr '\r' '\n' \
               | grep -v '^frames:' | tee "$OUT/run_${cfg}_$src.log" || echo "run $cfg $src: exit $?"
           done
         done ;;
    conv) python scripts/bench_conv.py --out "$OUT/conv.json" --tuned "$OUT/conv_tuned.json" 2>&1 | tee "$OUT/conv.log" ;;
    dittests) timeout "${DIT_LIMIT:-600}" python -m pytest -q -rs tests/gpu/test_gpu_dit.py 2>&1 | tee "$OUT/dit_tests.log" || echo "dittests: failures" ;;
    anchor) timeout "${DIT_LIMIT:-600}" python scripts/anchor_self_forcing.py --self-forcing "${SELF_FORCING:?a Self-Forcing checkout}" --blocks "${DIT_BLOCKS:-7}" \
              --json "$OUT/anchor_self_forcing.json" 2>&1 | tee "$OUT/anchor_self_forcing.log" || echo "anchor: exit $?" ;;
    dit) timeout "${DIT_LIMIT:-600}" python scripts/bench_dit.py --config "${DIT_CONFIG:-wan-1.3b}" --blocks "${DIT_BLOCKS:-7}" ${DIT_MODES:+--modes "$DIT_MODES"} \
           --json "$OUT/dit_${DIT_CONFIG:-wan-1.3b}${TAG:-}.json" 2>&1 | tee "$OUT/dit_${DIT_CONFIG:-wan-1.3b}${TAG:-}.log" || echo "dit: exit $?" ;;
    *) echo "unknown stage $stage (build, tests, kernels, conv, bench, run, servetests, serve, dittests, anchor, dit)"; exit 2 ;;
  esac
done
