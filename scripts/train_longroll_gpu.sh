#!/usr/bin/env bash
# Issue 18 on one GPU (about 8 minutes on an H100): fine-tune the bundled generator on its own
# rollouts, distil the bundled video-to-video model to 2 and then 1 DDIM steps, and score
# everything, baselines included, with mirage-quality over 500 frames in 8 independent streams
# (one generated video is one sample: single-seed generation metrics vary by 2x between seeds)
# on the GPU in float32.
#
#   bash scripts/train_longroll_gpu.sh          # results in $OUT (the device tool's folder) or ./longroll-out
#   STEPS=1200 FRAMES=500 STREAMS=8 SF_PROB=0.5 SF_HORIZON=2 bash scripts/train_longroll_gpu.sh
#   DEVICE=cpu STEPS=2 BATCH=2 FRAMES=6 WINDOW=3 STREAMS=2 PYTHON=.venv/bin/python ...   # a smoke test on the CPU
#   PARTS=v2v TEACHER_CONFIG=base TEACHER_STEPS=3000 bash scripts/train_longroll_gpu.sh
#       # the students of another config: its 4-step video-to-video teacher is trained first
#       # (TEACHER_LIMIT seconds at most), then distilled as above
#
#   PARTS=dmd bash scripts/train_longroll_gpu.sh     # about 6 minutes: the generator by distribution matching
#   PARTS=dmd DMD_REGRESSIONS="1 2 4" DMD_CONTROL=0 bash scripts/train_longroll_gpu.sh   # an anchor sweep
#   PARTS="gen dmd" GEN_CONFIG=base TEACHER_STEPS=4000 TEACHER_LIMIT=240 ...  # another config's generator,
#       # trained first from scratch, then fine-tuned as above
#   DEVICE=cpu STEPS=2 BATCH=2 FRAMES=6 WINDOW=3 STREAMS=2 PARTS=dmd DMD_FAKE_UPDATES=1 PYTHON=... # its CPU smoke test
#
# PARTS: "gen v2v" (default), "gen" (the generator's runs), "v2v" (the students), "dmd" (the
# generator fine-tuned by distribution matching, train/dmd.py: with its own frames as context, one
# run per anchor weight in DMD_REGRESSIONS (--dmd-regression, default "4"), and, as a control unless
# DMD_CONTROL=0, without them (at the CLI's default anchor); DMD_EXIT: --dmd-exit; DMD_STEPS
# generator steps, default STEPS/3, as each also makes DMD_FAKE_UPDATES (5) samples that train the
# fake score; lr DMD_LR, default 1e-4, as every fine-tune of this converged model at 5e-4 made it
# worse), or any of them together. The
# generator is checkpoints/tiny unless GEN_CONFIG names a config to train one of first. ONE_STEP=0
# stops the students after the 2-step one; WORKERS: data workers per training run (default 3);
# STUDENT_LR: the students' learning rate (default LR: a teacher trained here from scratch can take
# a higher one). TRAIN_ARGS and QUALITY_ARGS: more options for every training run and every report,
# e.g. a 512² config's TRAIN_ARGS="--data detailed --latent-cache 1500" QUALITY_ARGS="--data detailed".
# $OUT gets up to 6 files: tables.txt (every quality table and training summary), reports.tar.gz
# (the quality JSONs, for scripts/plot_quality.py, the training logs and drift plots),
# ckpt-gen-sf.tar (the two self-forced generators), ckpt-gen-ft.tar (the plain fine-tuned control),
# ckpt-gen-dmd.tar (the DMD generators), ckpt-v2v.tar (the 2- and 1-step students, v2v/s2 and v2v/s1).
set -euo pipefail
STEPS=${STEPS:-1200}  # optimizer steps of every training run
FRAMES=${FRAMES:-500}
LIMIT=${LIMIT:-230}  # seconds per training run at most: a checkpoint is saved every 500 steps
ROOT=$PWD
W=$(mktemp -d /tmp/longroll.XXXX)
mkdir -p "${OUT:=longroll-out}" && OUT=$(cd "$OUT" && pwd)
py=${PYTHON:-python3}
if ! $py -c "import mirage.cli" 2>/dev/null; then  # not installed: import this checkout as `mirage`
  mkdir -p "$W/path" && ln -sfn "$PWD" "$W/path/mirage" && export PYTHONPATH="$W/path${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || echo "no nvidia-smi"; } | tee "$W/gpu.txt"

train() {  # NAME ARGS...: one run, bf16, batch 128, at the lr of a fine-tune
  local name=$1; shift
  timeout "$LIMIT" $py -m mirage.cli.train --batch-size "${BATCH:-128}" --precision bf16 --device "${DEVICE:-cuda}" --workers "${WORKERS:-3}" \
    --steps "$STEPS" --lr "${LR:-5e-4}" --out "$W/$name" "$@" ${TRAIN_ARGS:-} > "$W/$name.log" 2>&1 || echo "train $name: exit $?" >> "$W/$name.log"
}
quality() {  # NAME MODEL ARGS...: the report of a checkpoint, STREAMS rollouts (seeds 0..STREAMS-1) as one batch
  local name=$1; shift
  OMP_NUM_THREADS=1 $py -m mirage.cli.quality "$@" --frames "$FRAMES" --window "${WINDOW:-50}" --streams "${STREAMS:-8}" \
    --device "${QDEVICE:-${DEVICE:-cuda}}" --json "$W/q-$name.json" ${QUALITY_ARGS:-} \
    > "$W/q-$name.txt" 2>&1 || echo "quality $name: exit $?" >> "$W/q-$name.txt"
}

PARTS=${PARTS:-gen v2v}
TEACHER=checkpoints/tiny-v2v
generator() {
  # the generator fine-tuned with self-forcing (from pure noise, and SDEdit-anchored at strength 0.5)
  # and, as a control, without, in parallel; then their reports
  train gen-sf --init-from "$GEN_FROM" --self-forcing-prob "${SF_PROB:-0.5}" --self-forcing-horizon "${SF_HORIZON:-2}" &
  train gen-sfa --init-from "$GEN_FROM" --self-forcing-prob "${SF_PROB:-0.5}" --self-forcing-horizon "${SF_HORIZON:-2}" \
    --self-forcing-strength "${SF_STRENGTH:-0.5}" &
  train gen-ft --init-from "$GEN_FROM" &
  quality gen-base "$GEN_FROM" &
  wait
  quality gen-sf "$W/gen-sf" &
  quality gen-sfa "$W/gen-sfa" &
  quality gen-ft "$W/gen-ft" &
  wait
}
students() {
  # the 2-step student of the 4-step video-to-video teacher (trained first for TEACHER_CONFIG), then
  # the 1-step student of the 2-step one: mirage-train's distillation chain, into v2v/s2 and v2v/s1;
  # the teacher's reports at 4, 2 and 1 steps beside theirs
  if [ -n "${TEACHER_CONFIG:-}" ]; then
    LIMIT=${TEACHER_LIMIT:-$LIMIT} train v2v-t4 --config "$TEACHER_CONFIG" --task v2v --steps "${TEACHER_STEPS:-$STEPS}"
    TEACHER=$W/v2v-t4
  fi
  local chain=4,2,1 stages=2
  [ "${ONE_STEP:-1}" = 1 ] || { chain=4,2; stages=1; }
  LIMIT=$(( LIMIT * stages )) LR=${STUDENT_LR:-${LR:-5e-4}} train v2v --distill-chain "$chain" --distill-from "$TEACHER" &
  quality v2v-t4 "$TEACHER" &
  quality v2v-t2 "$TEACHER" --steps 2 &
  quality v2v-t1 "$TEACHER" --steps 1 &
  wait
  quality v2v-s2 "$W/v2v/s2" &
  [ "${ONE_STEP:-1}" = 1 ] && quality v2v-s1 "$W/v2v/s1" &
  wait
}
distribution_matching() {
  # DMD from the generator, self-forced (its own frames as the newest context, every step) at each
  # anchor weight of DMD_REGRESSIONS, and (DMD_CONTROL=1) once not self-forced, all in parallel; the
  # generator's own report beside theirs unless the gen part makes it
  local dmd=(--dmd-from "$GEN_FROM" --dmd-fake-updates "${DMD_FAKE_UPDATES:-5}" --dmd-exit "${DMD_EXIT:-random}")
  local runs=() r STEPS=${DMD_STEPS:-$(( (STEPS + 2) / 3 ))} LR=${DMD_LR:-1e-4}  # train() reads both
  for r in ${DMD_REGRESSIONS:-4}; do
    train "gen-dmd-sf-r$r" "${dmd[@]}" --dmd-regression "$r" --self-forcing-prob "${DMD_SF_PROB:-1}" \
      --self-forcing-horizon "${SF_HORIZON:-2}" &
    runs+=("gen-dmd-sf-r$r")
  done
  if [ "${DMD_CONTROL:-1}" = 1 ]; then
    train gen-dmd "${dmd[@]}" &
    runs+=(gen-dmd)
  fi
  case " $PARTS " in *" gen "*) ;; *) quality gen-base "$GEN_FROM" & ;; esac
  wait
  for r in "${runs[@]}"; do quality "$r" "$W/$r" & done
  wait
}
GEN_FROM=checkpoints/tiny
if [ -n "${GEN_CONFIG:-}" ] && case " $PARTS " in *" gen "*|*" dmd "*) true ;; *) false ;; esac; then
  # the generator of another config is trained first, from scratch, like TEACHER_CONFIG's teacher
  LIMIT=${TEACHER_LIMIT:-$LIMIT} train gen-t --config "$GEN_CONFIG" --steps "${TEACHER_STEPS:-$STEPS}"
  GEN_FROM=$W/gen-t
fi
case " $PARTS " in *" gen "*) generator & ;; esac
case " $PARTS " in *" dmd "*) distribution_matching & ;; esac
case " $PARTS " in *" v2v "*) students & ;; esac
wait

{ for f in "$W"/*.log; do echo "== $(basename "$f")"; tail -c 600 "$f" | tr '\r' '\n' | tail -n 2; done
  for f in "$W"/q-*.txt; do echo "== $(basename "$f")"; cat "$f"; done; } | tee "$OUT/tables.txt"
plot() {  # METRIC REPORT...: drift curves beside the tables, W/METRIC-FIRST.png
  local metric=$1; shift
  $py "$ROOT/scripts/plot_quality.py" "$@" --metric "$metric" --out "$metric-${1%.json}.png" >/dev/null 2>&1 || true
}
cd "$W"
for m in sharpness_ratio motion_ratio flicker_ratio feature_distance; do
  plot "$m" q-gen-base.json q-gen-ft.json q-gen-sf.json q-gen-sfa.json
  plot "$m" q-gen-dmd*.json q-gen-base.json  # named after its first report: no clash with the above
done
plot psnr q-v2v-t4.json q-v2v-t2.json q-v2v-t1.json q-v2v-s2.json q-v2v-s1.json
shopt -s nullglob
tar czf "$OUT/reports.tar.gz" q-*.json *.log *.png gpu.txt
[ "${CKPTS:-1}" = 1 ] || exit 0  # CKPTS=0: no checkpoints back (a base model's are over the device tool's 16 MiB)
pack() {  # NAME FILE...: a tar of the checkpoint files that exist, none if there are none (the
  # device tool brings back at most 8 files of at most 16 MiB: tiny's weights are 5.7 MB each)
  local name=$1 f files=(); shift
  for f in "$@"; do [ -e "$f" ] && files+=("$f"); done
  [ ${#files[@]} = 0 ] || tar cf "$OUT/$name.tar" "${files[@]}"
}
pack ckpt-gen-sf gen-{sf,sfa}/{config.json,model.safetensors}
pack ckpt-gen-ft gen-ft/{config.json,model.safetensors}
pack ckpt-gen-dmd gen-dmd*/{config.json,model.safetensors}
pack ckpt-v2v v2v/s{2,1}/{config.json,model.safetensors}
