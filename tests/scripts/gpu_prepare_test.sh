#!/usr/bin/env bash
# scripts/gpu-prepare.sh fills the carry folder with GoogleTest sources that
# CMake can build (the folder the top-level CMakeLists.txt falls back to).
set -uo pipefail
src=${RETRACE_SOURCE_DIR:?RETRACE_SOURCE_DIR must name the source tree}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bash "$src/scripts/gpu-prepare.sh" "$tmp/third_party-gpu" || { echo "FAIL: gpu-prepare.sh exited $?"; exit 1; }
status=0
for f in googletest/CMakeLists.txt googletest/googletest/include/gtest/gtest.h \
         googletest/googletest/src/gtest-all.cc googletest/googletest/src/gtest_main.cc \
         googletest/googlemock/CMakeLists.txt README; do
  [ -f "$tmp/third_party-gpu/$f" ] || { echo "FAIL: $f is missing"; status=1; }
done
[ $status -eq 0 ] && echo "gpu-prepare.sh checks passed"
exit $status
