#!/usr/bin/env bash
# Chromium for the GPU machine, whose image has none and cannot install one: bench_g2g's browser client (glass
# to glass) needs a headless Chromium, its chromedriver and selenium. This packs, from Debian 12's packages, into
# .chromew/ (git-ignored) for scripts/gpu_session.sh's `chrome` stage to unpack in /tmp/chromew:
#   - chromium-headless-shell (BROWSER; `chromium`, the full browser, is ~20 MB more packed) and chromium-driver,
#     with what they load of chromium-common (ICU's data, V8's snapshots, SwiftShader), without the locales
#     (en-US kept), the Vulkan validation layer and mock driver, the full browser's resources when not packed;
#   - the shared libraries they need (ldd's closure on this machine and two dlopened, as Debian packages extracted),
#     except glibc's own (the loader must be the image's): the image may lack any of them (X11, NSS, ALSA...) or
#     hold other versions; they are loaded by Chromium's processes alone (MIRAGE_CHROMIUM_LIBRARY_PATH), never by
#     the benchmark or the server, whose PyTorch keeps the image's libraries;
#   - one font (DejaVu Sans) and a fonts.conf naming it by a path relative to itself;
#   - selenium (its selenium-manager binaries removed: the driver's path is given) installed in site/, and the
#     wheels of its pure-Python dependencies in wheels/ (the stage installs those the image cannot import).
# The whole is one tar.xz (sha256 in .chromew/chromew.sha256) cut in parts of PART_KIB: the device tool carries at
# most 64 MiB per call, the ~57 MB tree included, so each part travels in its own call on the same warm machine
# (every call stashes the parts it carries in /tmp/chromew-parts; the last one runs the stage).
#   scripts/make_chromew.sh [PART_KIB=7168]     (Debian 12 with chromium installed: ldd's closure is this machine's;
#                                                 network to Debian's mirror and PyPI)
set -euo pipefail
PART=$((${1:-7168} * 1024))
BROWSER=${BROWSER:-chromium-headless-shell}
SELENIUM=selenium==4.51.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$work/debs" "$root"
fetch() {  # Debian packages $@, extracted into $root
  (cd "$work/debs" && apt-get download "$@" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  for p in "$@"; do dpkg -x "$work"/debs/"${p}"_*.deb "$root"; done
}
fetch "$BROWSER" chromium-common chromium-driver
exe=$root/usr/lib/chromium/$([ "$BROWSER" = chromium ] && echo chromium || echo chromium-headless-shell)
driver=$root/usr/lib/chromium/chromedriver
# the packages holding the libraries the binaries load (usr-merged paths: /lib and /usr/lib are one here)
if ldd "$exe" "$driver" | grep 'not found'; then echo "install $BROWSER's dependencies here first"; exit 1; fi
owner() { local p; for p in "$1" "$(readlink -f "$1")" "/usr$1" "${1#/usr}"; do dpkg -S "$p" 2>/dev/null && return; done
          echo "no package holds $1" >&2; return 1; }
libs=$(ldd "$exe" "$driver" "$root"/usr/lib/chromium/*.so "$root"/usr/lib/chromium/*.so.1 | awk '/=> \//{print $3}' | sort -u)
pkgs=$(for f in $libs; do owner "$f"; done | cut -d: -f1 | sort -u | grep -vx 'libc6\|chromium.*')
echo "libraries from: $pkgs" | tr '\n' ' '; echo
# and two that Chromium dlopens (seen in /proc/PID/maps during bench_g2g: loaded from outside a prefix without them)
fetch $pkgs libwayland-client0 libxcb-shm0 fonts-dejavu-core
# what neither the headless browser nor the driver reads
rm -rf "$root"/usr/share/{doc,man,lintian,bug,locale,info,gtk-doc} "$root"/etc "$root"/usr/bin \
  "$root"/usr/lib/chromium/{libVkLayer_khronos_validation.so,libVkICD_mock_icd.so}
find "$root"/usr/lib/chromium/locales -type f ! -name en-US.pak -delete
if [ "$BROWSER" != chromium ]; then rm -f "$root"/usr/lib/chromium/{resources.pak,chrome_100_percent.pak,chrome_200_percent.pak}; fi
find "$root"/usr/share/fonts -type f ! -name DejaVuSans.ttf -delete
find "$root" -type f \( -name '*.so*' -o -perm -u+x \) -exec sh -c 'file -b "$1" | grep -q "^ELF.*not stripped" && strip "$1"' _ {} \;
mkdir -p "$root"/etc/fonts
cat > "$root"/etc/fonts/fonts.conf <<'EOF'
<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "urn:fontconfig:fonts.dtd">
<fontconfig>
  <dir prefix="relative">../../usr/share/fonts</dir>
  <cachedir>/tmp/chromew-fontcache</cachedir>
</fontconfig>
EOF
# selenium and its dependencies: pure Python, for the image's Python 3.12
pip download -q --only-binary=:all: --python-version 3.12 -d "$work/wheels" "$SELENIUM"
pip install -q --no-index --no-deps --no-compile --target "$root/site" "$work"/wheels/selenium-*.whl
rm -rf "$root"/site/selenium/webdriver/common/{linux,macos,windows}* "$root"/site/bin
mkdir -p "$root/wheels" && cp "$work"/wheels/*.whl "$root/wheels/" && rm "$root"/wheels/selenium-*.whl
du -sh "$root" && du -sh "$root"/* "$root"/usr/lib/* | sort -h | tail -6
rm -rf .chromew && mkdir .chromew
tar -C "$root" -cf - . | xz -9e -T2 > "$work/chromew.tar.xz"
(cd "$work" && sha256sum chromew.tar.xz) > .chromew/chromew.sha256
split -b "$PART" -d -a 2 "$work/chromew.tar.xz" .chromew/chromew.tar.xz.part
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
ls -l .chromew
echo "packed $(stat -c %s "$work/chromew.tar.xz") bytes in $(ls .chromew/*.part* | wc -l) parts (one call each);" \
     "the largest call: tree $tree + part $PART bytes = $((tree + PART)) of 67108864"
