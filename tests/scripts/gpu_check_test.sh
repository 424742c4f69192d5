#!/usr/bin/env bash
# scripts/gpu-check.sh where no device is found (a stand-in nvidia-smi that
# answers as the driver's does on a machine without a GPU) or nvcc is
# missing: it must stop at the preflight with exit status 1, name what is
# missing, write a failing summary and build nothing. Also its usage error
# and its time budget (a stage past it is reported as not run).
set -uo pipefail
src=${RETRACE_SOURCE_DIR:?RETRACE_SOURCE_DIR must name the source tree}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bin"
printf '#!/bin/sh\necho "No devices were found"\nexit 6\n' >"$tmp/bin/nvidia-smi"
chmod +x "$tmp/bin/nvidia-smi"

failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
# run NAME [env...] -- args: runs gpu-check.sh, log in $tmp/NAME.log, rc in $rc.
run() {
  local name=$1
  shift
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  env PATH="$tmp/bin:$PATH" RETRACE_GPU_CHECK_BUILD_DIR="$tmp/build-$name" "${envs[@]}" \
    bash "$src/scripts/gpu-check.sh" "$@" >"$tmp/$name.log" 2>&1
  rc=$?
  echo "--- gpu-check.sh $* (exit $rc)"
  cat "$tmp/$name.log"
}

run nodevice -- "$tmp/out1"
[ $rc -eq 1 ] || fail "no device: exit status $rc, wanted 1"
grep -q 'MISSING: no CUDA device: nvidia-smi lists none (No devices were found)' "$tmp/nodevice.log" ||
  fail "no device: the message does not name the missing device"
grep -q 'supposed to have a GPU' "$tmp/nodevice.log" || fail "no device: no explanation"
grep -q '^result: FAIL' "$tmp/out1/summary.txt" || fail "no device: summary.txt does not say FAIL"
grep -q '^preflight  FAILED (missing)' "$tmp/out1/summary.txt" || fail "no device: summary.txt has no failed preflight"
[ -e "$tmp/build-nodevice" ] && fail "no device: it configured a build"
[ -s "$tmp/out1/env.txt" ] || fail "no device: env.txt is missing"

run nonvcc CUDACXX=/nonexistent/nvcc -- --require-gpu "$tmp/out2"
[ $rc -eq 1 ] || fail "no nvcc: exit status $rc, wanted 1"
grep -q 'MISSING: nvcc: CUDACXX names /nonexistent/nvcc' "$tmp/nonvcc.log" || fail "no nvcc: nvcc is not named"
grep -q 'MISSING: no CUDA device' "$tmp/nonvcc.log" || fail "no nvcc: the device is not named too"

# A rehearsal goes past the preflight; with no time left every stage is
# reported as not run, and the run fails.
run budget CUDACXX=/nonexistent/nvcc RETRACE_GPU_CHECK_BUDGET_S=0 -- --no-require-gpu "$tmp/out3"
[ $rc -eq 1 ] || fail "budget: exit status $rc, wanted 1"
grep -q '^preflight  ok' "$tmp/out3/summary.txt" || fail "budget: the rehearsal's preflight did not pass"
grep -q '^configure  NOT RUN (time budget spent)' "$tmp/out3/summary.txt" || fail "budget: configure was not reported as not run"

run usage --
[ $rc -eq 2 ] || fail "usage: exit status $rc, wanted 2"

if [ $failures -gt 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "gpu-check.sh checks passed"
