#!/usr/bin/env bash
# The CPU-side logic of scripts/gpu-node-check.sh and
# scripts/gpu-node-prepare.sh, without a device, network or packages:
#   - gpu-node-check.sh refuses to run without the carried folder
#     (third_party-node/, which gpu-node-prepare.sh fills), naming it;
#   - where no device is found (a stand-in nvidia-smi that answers as the
#     driver does on a machine without a GPU) it stops at the preflight with
#     exit status 1, names the device, and configures nothing;
#   - a rehearsal (--no-require-gpu) goes past the preflight, and with no time
#     left reports the next stage as not run;
#   - gpu-node-prepare.sh --check-only fails a folder over its size budget and
#     passes one under it;
#   - both scripts answer a usage error with exit status 2.
set -uo pipefail
src=${RETRACE_SOURCE_DIR:?RETRACE_SOURCE_DIR must name the source tree}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bin"
printf '#!/bin/sh\necho "No devices were found"\nexit 6\n' >"$tmp/bin/nvidia-smi"
printf '#!/bin/sh\nexit 1\n' >"$tmp/bin/no-torch-python"
chmod +x "$tmp/bin/nvidia-smi" "$tmp/bin/no-torch-python"

# A carried folder with one (empty) package, and a LibTorch prefix that holds
# only the file the preflight looks for.
carried="$tmp/carried"
mkdir -p "$carried/debs" "$tmp/torch/Torch"
: >"$carried/debs/libfoo_1.0_amd64.deb"
echo "libfoo 1.0 libfoo_1.0_amd64.deb 0" >"$carried/MANIFEST"
: >"$tmp/torch/Torch/TorchConfig.cmake"

failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
# run NAME SCRIPT [env...] -- args: runs the script, log in $tmp/NAME.log, rc in $rc.
run() {
  local name=$1 script=$2
  shift 2
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  env PATH="$tmp/bin:$PATH" RETRACE_NODE_BUILD_DIR="$tmp/build-$name" \
    RETRACE_NODE_PYTHON="$tmp/bin/no-torch-python" CUDACXX=/nonexistent/nvcc "${envs[@]}" \
    bash "$src/scripts/$script" "$@" >"$tmp/$name.log" 2>&1
  rc=$?
  echo "--- $script $* (exit $rc)"
  cat "$tmp/$name.log"
}

run nocarry gpu-node-check.sh RETRACE_NODE_CARRY_DIR="$tmp/absent" -- --torch-prefix "$tmp/torch" "$tmp/out1"
[ $rc -eq 1 ] || fail "no carried folder: exit status $rc, wanted 1"
grep -q "MISSING: the carried folder $tmp/absent/ (MANIFEST and debs/): run scripts/gpu-node-prepare.sh" "$tmp/nocarry.log" ||
  fail "no carried folder: the message does not name it and the way to make it"
grep -q '^preflight  FAILED (missing)' "$tmp/out1/summary.txt" || fail "no carried folder: summary.txt has no failed preflight"
grep -q '^result: FAIL' "$tmp/out1/summary.txt" || fail "no carried folder: summary.txt does not say FAIL"
[ -e "$tmp/build-nocarry" ] && fail "no carried folder: it made a build folder"

# Also without it in a rehearsal: the carried packages are needed everywhere.
run nocarry2 gpu-node-check.sh RETRACE_NODE_CARRY_DIR="$tmp/absent" -- --no-require-gpu --torch-prefix "$tmp/torch" "$tmp/out1b"
[ $rc -eq 1 ] || fail "no carried folder, rehearsal: exit status $rc, wanted 1"

# A listed package that is not there.
mkdir -p "$tmp/partial/debs"
cp "$carried/MANIFEST" "$tmp/partial/MANIFEST"
run partial gpu-node-check.sh RETRACE_NODE_CARRY_DIR="$tmp/partial" -- --no-require-gpu --torch-prefix "$tmp/torch" "$tmp/out1c"
[ $rc -eq 1 ] || fail "missing package: exit status $rc, wanted 1"
grep -q 'MISSING: packages listed in .*MANIFEST: libfoo_1.0_amd64.deb' "$tmp/partial.log" ||
  fail "missing package: the package is not named"

run nodevice gpu-node-check.sh RETRACE_NODE_CARRY_DIR="$carried" -- --torch-prefix "$tmp/torch" "$tmp/out2"
[ $rc -eq 1 ] || fail "no device: exit status $rc, wanted 1"
grep -q 'MISSING: no CUDA device: nvidia-smi lists none (No devices were found)' "$tmp/nodevice.log" ||
  fail "no device: the message does not name the missing device"
grep -q 'MISSING: nvcc: CUDACXX names /nonexistent/nvcc' "$tmp/nodevice.log" || fail "no device: nvcc is not named"
grep -q 'supposed to have a GPU' "$tmp/nodevice.log" || fail "no device: no explanation"
grep -q '^preflight  FAILED (missing)' "$tmp/out2/summary.txt" || fail "no device: summary.txt has no failed preflight"
[ -s "$tmp/out2/env.txt" ] || fail "no device: env.txt is missing"
[ -e "$tmp/build-nodevice" ] && fail "no device: it made a build folder"

run notorch gpu-node-check.sh RETRACE_NODE_CARRY_DIR="$carried" -- --no-require-gpu --torch-prefix "$tmp/absent" "$tmp/out3"
[ $rc -eq 1 ] || fail "no LibTorch: exit status $rc, wanted 1"
grep -q "MISSING: LibTorch: no Torch/TorchConfig.cmake under $tmp/absent" "$tmp/notorch.log" ||
  fail "no LibTorch: the message does not say where it looked"

run budget gpu-node-check.sh RETRACE_NODE_CARRY_DIR="$carried" RETRACE_NODE_CHECK_BUDGET_S=0 -- \
  --no-require-gpu --torch-prefix "$tmp/torch" "$tmp/out4"
[ $rc -eq 1 ] || fail "budget: exit status $rc, wanted 1"
grep -q '^preflight  ok' "$tmp/out4/summary.txt" || fail "budget: the rehearsal's preflight did not pass"
grep -q '^prefix     NOT RUN (time budget spent)' "$tmp/out4/summary.txt" || fail "budget: the prefix stage was not reported as not run"

run usage gpu-node-check.sh --
[ $rc -eq 2 ] || fail "usage: exit status $rc, wanted 2"
run usage2 gpu-node-check.sh -- "$tmp/out5" --torch-prefix
[ $rc -eq 2 ] || fail "usage (--torch-prefix without a value): exit status $rc, wanted 2"

# gpu-node-prepare.sh --check-only: a 2 MiB folder against budgets of 1 and 3 MiB.
mkdir -p "$tmp/node/debs"
head -c 2097152 /dev/zero >"$tmp/node/debs/big_1.0_amd64.deb"
echo "big 1.0 big_1.0_amd64.deb 2097152" >"$tmp/node/MANIFEST"
run over gpu-node-prepare.sh RETRACE_NODE_DEBS_BUDGET_MIB=1 -- --check-only "$tmp/node"
[ $rc -eq 1 ] || fail "prepare over budget: exit status $rc, wanted 1"
grep -q "FAIL: $tmp/node is 2.0 MiB, over its budget of 1 MiB" "$tmp/over.log" || fail "prepare over budget: no message"
run under gpu-node-prepare.sh RETRACE_NODE_DEBS_BUDGET_MIB=3 -- --check-only "$tmp/node"
[ $rc -eq 0 ] || fail "prepare under budget: exit status $rc, wanted 0"
grep -q 'what travels: working tree' "$tmp/under.log" || fail "prepare under budget: the total is not printed"
run total gpu-node-prepare.sh RETRACE_NODE_DEBS_BUDGET_MIB=3 RETRACE_NODE_TOTAL_BUDGET_MIB=1 -- --check-only "$tmp/node"
[ $rc -eq 1 ] || fail "prepare over the total budget: exit status $rc, wanted 1"
grep -q 'FAIL: what travels is .* MiB, over the budget of 1 MiB' "$tmp/total.log" || fail "prepare over the total budget: no message"
run noprep gpu-node-prepare.sh -- --check-only "$tmp/absent"
[ $rc -eq 1 ] || fail "prepare without a folder: exit status $rc, wanted 1"
run usage3 gpu-node-prepare.sh -- --bogus
[ $rc -eq 2 ] || fail "prepare usage: exit status $rc, wanted 2"

if [ $failures -gt 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "gpu-node-check.sh and gpu-node-prepare.sh checks passed"
