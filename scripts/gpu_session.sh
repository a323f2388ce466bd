#!/usr/bin/env bash
# One GPU session: build + check + time the kernels, then benchmark the runtime; logs and JSON
# go to $OUT (the device tool's output folder) or ./gpu-out.
#   STAGES="tests kernels bench" CONFIGS=tiny,base [VARIANTS=... PROFILE_VARIANTS=... STEPS=4 TAG=_x] scripts/gpu_session.sh
#   STAGES="servetests serve" SERVE_CASES="base:16 base:16:churn base-512:8 base-512:8:cpu-jpeg" scripts/gpu_session.sh
#   STAGES="run" [RUN_CONFIGS="base-512 base" RUN_FRAMES=300] scripts/gpu_session.sh
#   STAGES="g2g" [G2G_CASES="base:16 base-512:8" G2G_LIMIT=200] scripts/gpu_session.sh   (bench_g2g --client python)
# Glass to glass (bench_g2g --client browser) with a Chromium carried in parts, one a call, on one warm machine (each
# call within the previous one's 30 s warm time; .chromew: scripts/make_chromew.sh, which prints the number of parts):
#   STAGES="stash" scripts/gpu_session.sh
#       carry .chromew/chromew.tar.xz.part00 .chromew/chromew.sha256
#   ... the same for part01, part02, ... but the last:
#   STAGES="chrome" G2G_CASES="base:16" [G2G_LIMIT=200] scripts/gpu_session.sh
#       carry .chromew/chromew.tar.xz.partNN .chromew/chromew.sha256      (the last part: no room for diffusers)
#   STAGES="chrome" G2G_CASES="base-512:8" scripts/gpu_session.sh         (Chromium already unpacked in /tmp/chromew)
#       carry .whl/diffusers-0.42.1-py3-none-any.whl                      (the latent U-Net's TAESD)
#   STAGES="servedit" [SERVEDIT_CONFIG=wan-1.3b SERVEDIT_COUNTS=1,2,3 SERVEDIT_TAEHV=1 SERVEDIT_MAX_STRENGTH=0.6 SERVEDIT_FAST=1 \
#       SERVE_LIMIT=480] \
#       scripts/gpu_session.sh
# The DiT trained on the GPU, then its 500-frame drift over 8 clips beside the U-Net (two calls on one warm machine:
# the checkpoint waits in /tmp/dit-tiny-taesd-gpu and comes back in $OUT):
#   PACK=dittrain STAGES=dittrain [DITTRAIN_MINUTES=5 DITTRAIN_CLIPS=4096 DITTRAIN_BATCH=64 DITTRAIN_LR=2e-3] scripts/gpu_session.sh
#       carry .whl/diffusers-0.42.1-py3-none-any.whl                      (ae-taesd is diffusers' TAESD)
#   PACK=ditdrift STAGES=ditdrift [DITDRIFT_CLIPS=8 DITDRIFT_CACHE_FROM=input] scripts/gpu_session.sh
#       carry .whl/diffusers-0.42.1-py3-none-any.whl
#   STAGES="dittests anchor dit" SELF_FORCING=.anchor/Self-Forcing [DIT_CONFIG=wan-1.3b DIT_BLOCKS=7 DIT_MODES=... DIT_FP8=static] scripts/gpu_session.sh
# The DiT measurements and Ray's overhead in two calls on one warm machine (the second within its 30 s warm time):
#   PACK=dit STAGES="ditdecode ditattn ditcompile" scripts/gpu_session.sh
#       carry .whl/diffusers-0.42.1-py3-none-any.whl .rayw/site.tar.xz.part0 .rayw/site.sha256
#   PACK=ray STAGES="ray dittests" SERVE_LIMIT=200 DIT_LIMIT=120 scripts/gpu_session.sh
#       carry .rayw/site.tar.xz.part1 .rayw/site.sha256 .rayw/grpc      (.rayw: scripts/make_rayw.sh)
# (stages: build = the kernel library only, for this GPU's architecture; tests = the tests/gpu suite;
#  kernels = build + time the fused kernel; conv = cuDNN vs the Triton conv per seed880m layer; bench;
#  servetests = the serving and runtime GPU tests; serve = bench_serve, one server per CONFIG:STREAMS[:churn]
#  case, each under its own SERVE_LIMIT seconds so that a slow case cannot cost the others their JSON;
#  dittests = the DiT's GPU tests; anchor = Self-Forcing's own code on the same clip (a checkout in $SELF_FORCING,
#  never committed); dit = bench_dit for DIT_CONFIG; run = mirage-run --fast as a user runs it (pipelined), per
#  RUN_CONFIGS config with random weights, on an mp4 of its size and on --input synthetic, beside bench_runtime's
#  frame graph (runtime-fast, compile-fp16) in the same session: issue 30's "mirage-run >= 0.85x the graph's FPS";
#  servedit = bench_serve of a served DiT (SERVEDIT_CONFIG, default wan-1.3b, random bf16 weights) at 16 FPS per
#  stream for SERVEDIT_COUNTS streams, under SERVE_LIMIT: issue 29's "streams x FPS at p99 <= 2 block periods";
#  generation (the latents' preview) unless SERVEDIT_TAEHV=1: video-to-video through a random TAEHV (needs
#  mirage-serve --decoder); SERVEDIT_FAST=1: mirage-serve --fast (the DiT's graphs compiled by Inductor);
#  the latent U-Nets (base-512, seed880m-512: TAESD) in serve and g2g need diffusers: installed from $WHEELS as for
#  ditdecode;
#  ditdecode = wan-1.3b compile-graph with each decoder (DIT_DECODERS,
#  default taehv,wan-vae; the Wan VAE needs diffusers: installed for the run from its wheel in $WHEELS, default .whl
#  (the image has what it needs besides), when the image lacks it, else left out) and the profile by kernel kind; ditprofile = the profile alone;
#  ditblock = scripts/bench_dit_block.py: the served DiT block (mirage-serve's pipeline, DIT_BLOCK_BATCHES rows,
#  DIT_BLOCK_KERNELS eager and/or compile) by graph and kernel kind;
#  ditattn = wan-1.3b compile-graph on a clip reaching a full window (DIT_ATTN_BLOCKS, default 12) once per SDPA
#  backend in DIT_ATTENTION (default "auto cudnn flash"), each its own process and JSON; ditcompile = Inductor
#  without CUDA graphs (compile mode); ray = bench_serve with and without --ray (RAY_CASES, default "base:16 base:16:ray")
#  once Ray Serve imports: from the image, or unpacked from the parts of .rayw/site.tar.xz that this call and earlier
#  calls on the same machine carried (every call stashes the parts it carries in /tmp/rayw); chrome = g2g with
#  bench_g2g's browser client (glass to glass) instead of the Python one, its Chromium, chromedriver and selenium
#  unpacked in /tmp/chromew from the parts of .chromew/chromew.tar.xz stashed in /tmp/chromew-parts (the libraries
#  they bring are on LD_LIBRARY_PATH for Chromium's processes only: MIRAGE_CHROMIUM_LIBRARY_PATH); stash = only
#  keeping the .rayw and .chromew parts a call carries); dittrain = python -m mirage.cli.train_dit --device cuda
#  (dit-tiny-taesd); ditdrift = scripts/dit_drift.py on its checkpoint, float32 on the GPU
# Every stage with a time limit gets at most what is left of DEADLINE seconds (default 540: the device tool's
# 10-minute command, less a minute for the start and the transfers) and is skipped when under 30 s are left.
# PACK=NAME: every stage's files go into $OUT/NAME.tgz (rewritten after each stage), for the device tool's
# limit of 8 files coming back.
set -euo pipefail
# the repository is the package `mirage` (package-dir mapping); without an install, a symlink named mirage on PYTHONPATH
if ! python -c "import mirage" 2>/dev/null; then mkdir -p /tmp/mirage-pkg && ln -sfn "$PWD" /tmp/mirage-pkg/mirage && export PYTHONPATH=/tmp/mirage-pkg${PYTHONPATH:+:$PYTHONPATH}; fi
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
DEST=$OUT
if [ -n "${PACK:-}" ]; then OUT=$(mktemp -d); fi
STAGES=${STAGES:-"tests kernels bench"}
DEADLINE=${DEADLINE:-540}
if compgen -G ".rayw/site.tar.xz.part*" >/dev/null; then  # Ray's parts outlive this call on this machine
  mkdir -p /tmp/rayw && cp -r .rayw/. /tmp/rayw/ && echo "rayw: stashed $(ls .rayw | tr '\n' ' ')"
fi
if compgen -G ".chromew/chromew.tar.xz.part*" >/dev/null; then  # and Chromium's
  mkdir -p /tmp/chromew-parts && cp .chromew/* /tmp/chromew-parts/ && echo "chromew: stashed $(ls .chromew | tr '\n' ' ')"
fi
limit() {  # a stage's time limit: its own ($1), or what is left of DEADLINE if less
  local left=$((DEADLINE - SECONDS))
  echo $((left < $1 ? left : $1))
}
wheels() {  # make module $2 importable: already there, or installed for this run from the wheels $3 in folder $1
  python -c "import $2" 2>/dev/null && return 0
  compgen -G "$1/$3" >/dev/null || { echo "$2 is not installed here and $1 holds no $3"; return 1; }
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "/tmp/site-$2" "$1"/$3
  export PYTHONPATH="/tmp/site-$2${PYTHONPATH:+:$PYTHONPATH}"
  python -c "import $2; print('$2', $2.__version__, 'from $1')"
}
serve_cases() {  # bench_serve per CONFIG:STREAMS[:MODE] case of $@, each under SERVE_LIMIT (and DEADLINE)
  local case cfg n mode lim
  for case in "$@"; do
    IFS=: read -r cfg n mode <<< "$case"  # mode: churn (--churn), ray (--ray: through Ray Serve) or cpu-jpeg
    lim=$(limit "${SERVE_LIMIT:-300}")
    if [ "$lim" -lt 30 ]; then echo "serve $case: skipped, ${lim}s left of DEADLINE"; continue; fi
    timeout "$lim" python scripts/bench_serve.py --random "$cfg" --device cuda --fast --counts "$n" \
      --keep-going --startup-s 200 ${mode:+--$mode} --json "$OUT/serve_${cfg}_${n}${mode:+_$mode}.json" \
      2>&1 | tee "$OUT/serve_${cfg}_${n}${mode:+_$mode}.log" || echo "serve $case: exit $?"
  done
}
ray_site() {  # make Ray Serve importable: from the image, or from .rayw's parts stashed in /tmp/rayw
  python -c "import ray.serve, fastapi" 2>/dev/null && return 0
  if [ ! -d /tmp/site-ray ]; then
    local have
    have=$(cd /tmp/rayw 2>/dev/null && ls site.tar.xz.part* 2>/dev/null | tr '\n' ' ')
    cat /tmp/rayw/site.tar.xz.part* > /tmp/rayw/site.tar.xz 2>/dev/null || true
    if ! (cd /tmp/rayw 2>/dev/null && sha256sum --quiet -c site.sha256 >/dev/null 2>&1); then
      echo "ray: the Ray site is incomplete on this machine (parts here: ${have:-none}); carry the missing part of" \
           ".rayw in a call on this same warm machine (scripts/make_rayw.sh made them)"
      return 1
    fi
    mkdir -p /tmp/site-ray && tar -xJf /tmp/rayw/site.tar.xz -C /tmp/site-ray
  fi
  export PYTHONPATH="/tmp/site-ray${PYTHONPATH:+:$PYTHONPATH}"
  python -c "import grpc, google.protobuf, anyio, aiohttp; print('image: grpcio', grpc.__version__, 'protobuf',
             google.protobuf.__version__, 'anyio', anyio.__version__ if hasattr(anyio, '__version__') else '?',
             'aiohttp', aiohttp.__version__)" || true
  local wheel  # grpcio-reflection: the newest carried version that imports beside the image's grpcio and protobuf
  for wheel in $(ls /tmp/rayw/grpc/*.whl 2>/dev/null | sort -t- -k2 -V -r); do
    rm -rf /tmp/site-grpcr
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-grpcr "$wheel" 2>/dev/null
    if PYTHONPATH="/tmp/site-grpcr:$PYTHONPATH" python -c "import grpc_reflection.v1alpha.reflection" 2>/dev/null; then
      export PYTHONPATH="/tmp/site-grpcr:$PYTHONPATH"; echo "ray: $(basename "$wheel")"; break
    fi
  done
  python -c "import ray, ray.serve, fastapi, uvicorn, websockets; print('ray', ray.__version__, 'from /tmp/site-ray')"
}
chrome() {  # bench_g2g's browser client: Chromium and selenium from .chromew's parts stashed in /tmp/chromew-parts
  local prefix=/tmp/chromew wheel
  if [ ! -x $prefix/usr/lib/chromium/chromedriver ]; then
    local have
    have=$(cd /tmp/chromew-parts 2>/dev/null && ls chromew.tar.xz.part* 2>/dev/null | tr '\n' ' ')
    cat /tmp/chromew-parts/chromew.tar.xz.part* > /tmp/chromew-parts/chromew.tar.xz 2>/dev/null || true
    if ! (cd /tmp/chromew-parts 2>/dev/null && sha256sum --quiet -c chromew.sha256 >/dev/null 2>&1); then
      echo "chrome: Chromium is incomplete on this machine (parts here: ${have:-none}); carry the missing parts of" \
           ".chromew in calls on this same warm machine (scripts/make_chromew.sh made them)"
      return 1
    fi
    rm -rf $prefix.part && mkdir -p $prefix.part && tar -xJf /tmp/chromew-parts/chromew.tar.xz -C $prefix.part
    rm -rf $prefix && mv $prefix.part $prefix && rm /tmp/chromew-parts/chromew.tar.xz
    # Debian 12's libexpat and libstdc++ need glibc 2.36; Chromium needs 2.35: an older image keeps its own two
    if [ "$(getconf GNU_LIBC_VERSION | cut -d. -f2)" -lt 36 ]; then
      getconf GNU_LIBC_VERSION; rm -f $prefix/{usr/,}lib/x86_64-linux-gnu/{libexpat,libstdc++}*
    fi
  fi
  export MIRAGE_CHROMIUM=$(ls $prefix/usr/lib/chromium/chromium-headless-shell $prefix/usr/lib/chromium/chromium 2>/dev/null | head -1)
  export MIRAGE_CHROMEDRIVER=$prefix/usr/lib/chromium/chromedriver FONTCONFIG_FILE=$prefix/etc/fonts/fonts.conf
  local lib=$prefix/usr/lib/x86_64-linux-gnu  # with the folders its libraries name by absolute paths (RUNPATH, NSS)
  export MIRAGE_CHROMIUM_LIBRARY_PATH=$lib:$lib/pulseaudio:$lib/nss:$prefix/lib/x86_64-linux-gnu:$prefix/usr/lib/chromium
  # a small /dev/shm (containers) would cut Chromium's renderers short: their shared memory goes to /tmp then
  if [ "$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')" -lt 1024 ] 2>/dev/null || [ ! -d /dev/shm ]; then
    export MIRAGE_CHROMIUM_FLAGS="--disable-dev-shm-usage"
  fi
  LD_LIBRARY_PATH=$MIRAGE_CHROMIUM_LIBRARY_PATH ldd "$MIRAGE_CHROMIUM" "$MIRAGE_CHROMEDRIVER" | grep 'not found' || true
  LD_LIBRARY_PATH=$MIRAGE_CHROMIUM_LIBRARY_PATH "$MIRAGE_CHROMIUM" --version || { echo "chrome: Chromium does not run"; return 1; }
  if ! python -c "import selenium" 2>/dev/null; then  # selenium, and those of its dependencies the image lacks
    if [ ! -d /tmp/site-selenium ]; then
      rm -rf /tmp/site-selenium.part && cp -r $prefix/site /tmp/site-selenium.part
      # the carried wheels pip would install beside the image's packages (missing, or versions selenium refuses)
      sed -n 's/^Requires-Dist: //p' $prefix/site/selenium-*.dist-info/METADATA | grep -v 'extra ==' > /tmp/chromew-reqs.txt
      python -m pip install -q --dry-run --no-index --find-links $prefix/wheels --report /tmp/chromew-deps.json \
        -r /tmp/chromew-reqs.txt
      wheel=$(python -c "import json; print(' '.join(i['download_info']['url'].removeprefix('file://')
                                                     for i in json.load(open('/tmp/chromew-deps.json'))['install']))")
      echo "chrome: installing ${wheel:-nothing} for selenium"
      [ -z "$wheel" ] || python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                           --target /tmp/site-selenium.part $wheel
      mv /tmp/site-selenium.part /tmp/site-selenium
    fi
    export PYTHONPATH="/tmp/site-selenium${PYTHONPATH:+:$PYTHONPATH}"
  fi
  python -c "import selenium, trio, urllib3; print('selenium', selenium.__version__, 'urllib3', urllib3.__version__)"
}
g2g_cases() {  # bench_g2g --client $1 per CONFIG:STREAMS case of G2G_CASES, each under G2G_LIMIT (and DEADLINE)
  local case cfg n lim
  wheels "${WHEELS:-.whl}" diffusers "diffusers-*.whl" || true
  for case in ${G2G_CASES:-base:16 base-512:8}; do
    IFS=: read -r cfg n <<< "$case"
    lim=$(limit "${G2G_LIMIT:-200}")
    if [ "$lim" -lt 30 ]; then echo "g2g $1 $case: skipped, ${lim}s left of DEADLINE"; continue; fi
    timeout "$lim" python scripts/bench_g2g.py --client "$1" --random "$cfg" --device cuda --fast \
      --streams "$n" --json "$OUT/g2g_$1_${cfg}_$n.json" 2>&1 | tee "$OUT/g2g_$1_${cfg}_$n.log" \
      || echo "g2g $1 $case: exit $?"
  done
}
dit_bench() {  # NAME LIMIT ARGS...: bench_dit for wan-1.3b (DIT_CONFIG) -> $OUT/NAME.json and .log
  local name=$1 lim
  lim=$(limit "$2")
  shift 2
  if [ "$lim" -lt 30 ]; then echo "$name: skipped, ${lim}s left of DEADLINE"; return 0; fi
  timeout "$lim" python scripts/bench_dit.py --config "${DIT_CONFIG:-wan-1.3b}" --json "$OUT/$name.json" "$@" 2>&1 \
    | tee "$OUT/$name.log" || echo "$name: exit $? (124: cut at its ${lim} s limit)"
}
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
    serve) wheels "${WHEELS:-.whl}" diffusers "diffusers-*.whl" || true
           serve_cases ${SERVE_CASES:-base:16} ;;
    servedit) lim=$(limit "${SERVE_LIMIT:-480}")
              name=servedit_${SERVEDIT_CONFIG:-wan-1.3b}${SERVEDIT_TAEHV:+_taehv}${SERVEDIT_MAX_STRENGTH:+_max$SERVEDIT_MAX_STRENGTH}${SERVEDIT_FAST:+_fast}
              if [ "$lim" -lt 30 ]; then echo "servedit: skipped, ${lim}s left of DEADLINE"; continue; fi
              timeout "$lim" python scripts/bench_serve.py --random "${SERVEDIT_CONFIG:-wan-1.3b}" --device cuda \
                --fps 16 --counts "${SERVEDIT_COUNTS:-1,2,3}" --keep-going --startup-s 240 --seconds 8 --warmup-s 4 \
                --calibrate-steps 5 ${SERVEDIT_TAEHV:+--taehv} ${SERVEDIT_FAST:+--fast} \
                ${SERVEDIT_MAX_STRENGTH:+--serve-args "--max-strength $SERVEDIT_MAX_STRENGTH"} --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" \
                || echo "servedit: exit $? (124: cut at its ${lim} s limit; the JSON holds the counts done)" ;;
    dittrain) wheels "${WHEELS:-.whl}" diffusers "diffusers-*.whl" || true  # ae-taesd is diffusers' TAESD
              rm -rf /tmp/dit-tiny-taesd-gpu  # the bar's \r updates as lines, one in 200 (a 5-minute run makes ~10^5)
              python -m mirage.cli.train_dit --device cuda --out /tmp/dit-tiny-taesd-gpu \
                --minutes "${DITTRAIN_MINUTES:-5}" --clips "${DITTRAIN_CLIPS:-4096}" --batch-size "${DITTRAIN_BATCH:-64}" \
                --lr "${DITTRAIN_LR:-2e-3}" 2>&1 | tr '\r' '\n' | awk 'NR % 200 == 1 || !/it\/s|step\/s|clip\/s/' \
                | tee "$OUT/dittrain.log" || echo "dittrain: exit $?"
              cp -r /tmp/dit-tiny-taesd-gpu "$OUT/" || true ;;
    ditdrift) wheels "${WHEELS:-.whl}" diffusers "diffusers-*.whl" || true
              lim=$(limit "${DITDRIFT_LIMIT:-540}")
              timeout "$lim" python scripts/dit_drift.py --dit /tmp/dit-tiny-taesd-gpu --clips "${DITDRIFT_CLIPS:-8}" \
                --device cuda ${DITDRIFT_CACHE_FROM:+--cache-from "$DITDRIFT_CACHE_FROM"} --json "$OUT/dit_drift.json" 2>&1 | tee "$OUT/dit_drift.log" || echo "ditdrift: exit $?" ;;
    g2g) g2g_cases python ;;  # the Python client, which needs no Chromium: NOT glass to glass
    chrome) if chrome > >(tee "$OUT/chrome.log") 2>&1; then g2g_cases browser; fi ;;  # not piped: chrome exports
    ray) if ray_site; then serve_cases ${RAY_CASES:-base:16 base:16:ray}; fi ;;
    stash) ;;  # nothing but what every call does first: keep the .rayw and .chromew parts it carries in /tmp
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
    dittests) lim=$(limit "${DIT_LIMIT:-600}")
              if [ "$lim" -lt 30 ]; then echo "dittests: skipped, ${lim}s left of DEADLINE"; continue; fi
              timeout "$lim" python -m pytest -q -rs tests/gpu/test_gpu_dit.py tests/gpu/test_gpu_fp8.py 2>&1 | tee "$OUT/dit_tests.log" || echo "dittests: failures" ;;
    anchor) timeout "${DIT_LIMIT:-600}" python scripts/anchor_self_forcing.py --self-forcing "${SELF_FORCING:?a Self-Forcing checkout}" --blocks "${DIT_BLOCKS:-7}" \
              --json "$OUT/anchor_self_forcing.json" 2>&1 | tee "$OUT/anchor_self_forcing.log" || echo "anchor: exit $?" ;;
    dit) timeout "${DIT_LIMIT:-600}" python scripts/bench_dit.py --config "${DIT_CONFIG:-wan-1.3b}" --blocks "${DIT_BLOCKS:-7}" ${DIT_MODES:+--modes "$DIT_MODES"} ${DIT_FP8:+--fp8 "$DIT_FP8"} \
           --json "$OUT/dit_${DIT_CONFIG:-wan-1.3b}${TAG:-}.json" 2>&1 | tee "$OUT/dit_${DIT_CONFIG:-wan-1.3b}${TAG:-}.log" || echo "dit: exit $?" ;;
    ditdecode) decoders=${DIT_DECODERS:-taehv,wan-vae}
               if [[ $decoders == *wan-vae* ]] && ! wheels "${WHEELS:-.whl}" diffusers "diffusers-*.whl"; then
                 decoders=$(echo "$decoders" | sed 's/,*wan-vae//; s/^,//'); echo "ditdecode: without the Wan VAE"
               fi
               dit_bench dit_decode "${DIT_DECODE_LIMIT:-170}" --modes compile-graph --blocks "${DIT_BLOCKS:-7}" \
                 ${decoders:+--decoders "$decoders"} --profile ;;
    ditblock) lim=$(limit "${DIT_BLOCK_LIMIT:-240}")  # the served block (the server's pipeline), by graph and kernel kind
              if [ "$lim" -lt 30 ]; then echo "ditblock: skipped, ${lim}s left of DEADLINE"; continue; fi
              timeout "$lim" python scripts/bench_dit_block.py --config "${DIT_CONFIG:-wan-1.3b}" \
                --batches "${DIT_BLOCK_BATCHES:-2,3}" --kernels "${DIT_BLOCK_KERNELS:-compile}" \
                --json "$OUT/dit_block.json" 2>&1 | tee "$OUT/dit_block.log" || echo "ditblock: exit $?" ;;
    ditprofile) dit_bench dit_profile "${DIT_PROFILE_LIMIT:-150}" --modes compile-graph --blocks "${DIT_BLOCKS:-7}" --profile ;;
    ditattn) for backend in ${DIT_ATTENTION:-auto cudnn flash}; do
               dit_bench "dit_attn_$backend" "${DIT_ATTN_LIMIT:-95}" --modes compile-graph --attention "$backend" \
                 --blocks "${DIT_ATTN_BLOCKS:-12}"
             done ;;
    ditcompile) dit_bench dit_compile "${DIT_COMPILE_LIMIT:-80}" --modes compile --blocks "${DIT_BLOCKS:-7}" ;;
    *) echo "unknown stage $stage (build, tests, kernels, conv, bench, run, servetests, serve, servedit, g2g, dittests, anchor,"\
            "dit, ditblock, ditdecode, ditprofile, ditattn, ditcompile, dittrain, ditdrift, ray, chrome, stash)"; exit 2 ;;
  esac
  if [ -n "${PACK:-}" ]; then tar -czf "$DEST/$PACK.tgz.part" -C "$OUT" . && mv "$DEST/$PACK.tgz.part" "$DEST/$PACK.tgz"; fi
done
