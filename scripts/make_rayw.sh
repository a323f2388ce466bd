#!/usr/bin/env bash
# Ray Serve for the GPU machine, whose image lacks it and cannot install it: a site folder (Ray and the
# packages of ray[serve] the image does not hold) packed as .rayw/ (git-ignored) for scripts/gpu_session.sh's
# `ray` stage to unpack. The device tool carries at most 64 MiB per call, the tree included (~52 MB, mostly
# checkpoints/), and Ray's wheel alone is 79 MB, so the site is slimmed and split in two parts that travel
# in two calls on the same warm machine (the first stashes its part in /tmp):
#   - Ray without what `mirage-serve --ray` never loads: its Java jars (32 MB), the dashboard's web client (the
#     dashboard is off), RLlib, Tune, Train, Data and LLM; its binaries stripped of their symbol tables;
#   - the serve packages missing from the image (docs/device KINDS list; checked by running bench_serve --ray
#     on the CPU in a venv holding only the image's packages plus these): pydantic(-core), annotated-types,
#     typing-inspection, fastapi, opentelemetry-api, starlette, uvicorn, websockets (uvicorn's WebSockets),
#     jsonschema(-specifications), referencing, rpds-py;
#   - grpcio-reflection apart, in several versions (.rayw/grpc/): Serve imports it, and it must not be newer
#     than the image's grpcio and protobuf, whose versions are not known here; the stage keeps the newest
#     that imports.
#   scripts/make_rayw.sh [FIRST_PART_KIB=6656]      (needs network to PyPI, python3.12 for the cp312 wheels' pip)
set -euo pipefail
FIRST=$((${1:-6656} * 1024))  # bytes of part0: what the first call has room for beside .whl (diffusers)
RAY=2.60.0
SERVE_PKGS="pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 fastapi==0.165.0
  opentelemetry-api==1.45.2 starlette==1.10.0 uvicorn==0.55.0 websockets==17.4 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0"
GRPC_REFLECTION="1.85.1 1.80.0 1.75.1 1.71.0 1.66.2 1.62.3"
PY=${PY312:-python3.12}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
download() {  # cp312 manylinux wheels, no dependencies (each needed one is named)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d "$@"
}
download "$work/wheels" "ray==$RAY" $SERVE_PKGS
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" "$work"/wheels/*.whl
site=$work/site
rm -rf "$site"/ray/{jars,dashboard/client/build,rllib,tune,train,data,llm} "$site"/bin
find "$site" -type f \( -name '*.so' -o -perm -u+x \) -exec sh -c 'file -b "$1" | grep -q ^ELF && strip "$1"' _ {} \;
rm -rf .rayw && mkdir -p .rayw/grpc
tar -C "$site" -cf - . | xz -9e -T2 > "$work/site.tar.xz"
(cd "$work" && sha256sum site.tar.xz) > .rayw/site.sha256
head -c "$FIRST" "$work/site.tar.xz" > .rayw/site.tar.xz.part0
tail -c "+$((FIRST + 1))" "$work/site.tar.xz" > .rayw/site.tar.xz.part1
for v in $GRPC_REFLECTION; do download .rayw/grpc "grpcio-reflection==$v"; done
ls -l .rayw .rayw/grpc
du -cb .rayw/site.tar.xz.part0 | tail -1 | sed 's/total/first call (part0)/'
du -cb .rayw/site.tar.xz.part1 .rayw/site.sha256 .rayw/grpc | tail -1 | sed 's/total/second call (part1, grpc)/'
