#!/usr/bin/env bash
# Collects, on this (networked, Debian) machine, what scripts/gpu-check.sh
# needs on a GPU machine that has CUDA, CMake and PyTorch but no GoogleTest
# and no network: the GoogleTest sources, copied into third_party-gpu/
# (ignored by git; the device run names it in `carry`). The top-level
# CMakeLists.txt builds them when GTest is not installed.
#
#   scripts/gpu-prepare.sh [OUT_DIR]     default: third_party-gpu
#
# Takes the sources of the installed Debian package (googletest, which
# libgtest-dev depends on; /usr/src/googletest), or, when it is not
# installed, downloads the package with apt-get download and unpacks it with
# dpkg -x into a folder of its own (nothing is installed);
# RETRACE_GPU_PREPARE_DOWNLOAD=1 takes that way even when it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-third_party-gpu}

# The googletest source tree (the folder holding CMakeLists.txt, googletest/
# and googlemock/) listed by package $1 under root $2 ("" = installed).
find_tree() {
  local listing
  if [ -z "$2" ]; then
    listing=$(dpkg -L "$1" 2>/dev/null || true)
  else
    listing=$(dpkg -c "$2"/*.deb 2>/dev/null | awk '{print $NF}' | sed 's|^\./|/|' || true)
  fi
  grep -E '/googletest/CMakeLists\.txt$' <<<"$listing" | grep -v '/googletest/googletest/' |
    head -n 1 | sed 's|/CMakeLists\.txt$||'
}

src=""
version=""
for pkg in googletest libgtest-dev; do
  [ "${RETRACE_GPU_PREPARE_DOWNLOAD:-0}" = 1 ] && break
  tree=$(find_tree "$pkg" "")
  if [ -n "$tree" ] && [ -f "$tree/CMakeLists.txt" ]; then
    src=$tree
    version="$pkg $(dpkg-query -W -f='${Version}' "$pkg")"
    break
  fi
done

tmp=""
cleanup() { if [ -n "$tmp" ]; then rm -rf "$tmp"; fi; }
trap cleanup EXIT
if [ -z "$src" ]; then
  echo "gpu-prepare: downloading the Debian package googletest for its sources" >&2
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download googletest >/dev/null) || {
    echo "gpu-prepare: apt-get download googletest failed (run apt-get update first?)" >&2
    exit 1
  }
  tree=$(find_tree googletest "$tmp")
  dpkg -x "$tmp"/googletest_*.deb "$tmp/root"
  src="$tmp/root$tree"
  version="googletest $(dpkg-deb -f "$tmp"/googletest_*.deb Version)"
  if [ -z "$tree" ] || [ ! -f "$src/CMakeLists.txt" ]; then
    echo "gpu-prepare: the googletest package holds no source tree" >&2
    exit 1
  fi
fi

rm -rf "$out/googletest"
mkdir -p "$out"
cp -RL "$src" "$out/googletest"
cat >"$out/README" <<EOF
Build inputs for scripts/gpu-check.sh on a GPU machine without GoogleTest or
network, collected by scripts/gpu-prepare.sh (not tracked by git).
googletest/: the GoogleTest sources of the Debian package $version.
EOF
echo "gpu-prepare: GoogleTest sources ($version) in $out/googletest ($(du -sh "$out" | cut -f1))"
