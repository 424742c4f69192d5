#!/usr/bin/env bash
# Installs dependencies, configures, builds and runs every test with CTest.
#   scripts/test.sh              plain build in build/
#   scripts/test.sh --sanitize   address+undefined sanitizers in build-asan/
# Extra arguments after -- go to ctest (e.g. -- -R store).
set -euo pipefail
cd "$(dirname "$0")/.."

sanitize=""
ctest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --sanitize) sanitize="address,undefined"; shift ;;
    --) shift; ctest_args=("$@"); break ;;
    *) echo "usage: scripts/test.sh [--sanitize] [-- ctest args]" >&2; exit 2 ;;
  esac
done

bash scripts/setup.sh

# LibTorch's OpenMP workers spin while waiting by default, which on a small
# shared machine starves the other test processes; make them sleep instead.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

build_dir=build
cmake_args=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo)
if [ -n "$sanitize" ]; then
  build_dir=build-asan
  # The sanitizers instrument host code; the CUDA kernels are checked with
  # compute-sanitizer on a GPU (scripts/gpu-check.sh), so this build leaves
  # them out and takes half the time.
  cmake_args+=(-DRETRACE_SANITIZE="$sanitize" -DRETRACE_BUILD_BENCH=OFF
               -DRETRACE_WITH_CUDA=OFF)
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
fi

jobs=$(nproc)
cmake -S . -B "$build_dir" "${cmake_args[@]}" >/dev/null
cmake --build "$build_dir" -j "$jobs"
ctest --test-dir "$build_dir" --output-on-failure -j "$jobs" "${ctest_args[@]}"
