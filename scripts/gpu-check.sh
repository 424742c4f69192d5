#!/usr/bin/env bash
# The whole GPU check in one bounded run, for a bare GPU machine that has
# CUDA (nvcc), CMake and PyTorch but no GoogleTest, gRPC or network:
#   1. preflight  nvcc, a device (nvidia-smi), python3 with torch; records
#                 nvidia-smi, driver, CUDA, GPU model, tool versions (env.txt)
#   2. configure  the kernels-only Release build in build-gpu/ (CUDA
#                 architecture of the device), GoogleTest from the installed
#                 package or from third_party-gpu/ (scripts/gpu-prepare.sh)
#   3. build      with all cores
#   4. ctest -L gpu, which must run every gpu test: a test that skips (no
#                 device found) counts as a failure
#   5. bench      scripts/bench.sh scan on the same build: the GPU scan
#                 benchmark (bench/scan_gpu_bench.cc) with its RATIO lines
#   6. memcheck, racecheck: compute-sanitizer on bench/gpu_smoke.cc (a small
#                 scan and projection checked against the CPU)
# and writes into OUT_DIR: summary.txt (stages, times, test counts, figures,
# RATIO lines), env.txt, build.log, ctest.log, bench.txt, sanitizer.log.
# Each stage prints a UTC timestamp; the whole run stays within a time budget
# (RETRACE_GPU_CHECK_BUDGET_S, default 420 s), and a stage that would start
# past it is reported as not run.
#
#   scripts/gpu-check.sh [--require-gpu | --no-require-gpu] [--quick] OUT_DIR
#
# --require-gpu (the default): a missing nvcc or device fails at once, loudly
# (exit 1, naming what is missing), and so does a skipped gpu test or a
# sanitizer that cannot run. --no-require-gpu runs whatever this machine
# allows (a rehearsal on a machine without a device). --quick: a small store
# (the benchmark's figures then mean nothing). Exit status: 0 when every stage
# passed, 1 otherwise, 2 for a usage error.
#
# Environment: RETRACE_GPU_CHECK_BUILD_DIR (build-gpu),
# RETRACE_GPU_CHECK_CUDA_ARCHS (default: the device's, e.g. 90),
# RETRACE_GPU_CHECK_BENCH_ARGS (arguments for scan_gpu_bench), CUDACXX.
#
# On the device machine (prepare here first: scripts/gpu-prepare.sh), with
# the device tool's run verb:
#   command:   bash scripts/gpu-check.sh "$OUT"
#   carry:     ["third_party-gpu"]
#   kind:      nvidia-h200
#   timeout_s: 480
# The files under $OUT come back (8 files at most: this script writes 6). A
# rerun on the still-warm machine finds build-gpu/ there (ignored build
# outputs are kept between calls) and only rebuilds what changed; give it a
# smaller budget to fit what device time is left, e.g.
#   command:   RETRACE_GPU_CHECK_BUDGET_S=200 bash scripts/gpu-check.sh "$OUT"
#   timeout_s: 260
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: scripts/gpu-check.sh [--require-gpu | --no-require-gpu] [--quick] OUT_DIR" >&2
}

require_gpu=1
quick=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --require-gpu) require_gpu=1 ;;
    --no-require-gpu) require_gpu=0 ;;
    --quick) quick=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage; exit 2 ;;
    *) [ -n "$out" ] && { usage; exit 2; }; out=$1 ;;
  esac
  shift
done
[ -z "$out" ] && { usage; exit 2; }
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)

build=${RETRACE_GPU_CHECK_BUILD_DIR:-build-gpu}
budget=${RETRACE_GPU_CHECK_BUDGET_S:-420}
t_start=$(date +%s)
deadline=$((t_start + budget))
summary="$out/summary.txt"
env_log="$out/env.txt"
build_log="$out/build.log"
ctest_log="$out/ctest.log"
bench_log="$out/bench.txt"
sanitizer_log="$out/sanitizer.log"
: >"$build_log"
: >"$sanitizer_log"

stage_tool=gpu-check
# shellcheck source=lib/stages.sh
source scripts/lib/stages.sh

gpu_line="unknown"
test_line="not run"
write_summary() {
  {
    echo "retrace gpu-check, $(ts), $(hostname 2>/dev/null || echo unknown host)"
    echo "mode: $([ $require_gpu = 1 ] && echo require-gpu || echo no-require-gpu)$([ $quick = 1 ] && echo ', quick')"
    echo "GPU: $gpu_line"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no git)')"
    echo
    printf '%-10s %-28s %-20s %8s  %s\n' stage status started seconds note
    local s
    for s in "${stages[@]}"; do
      IFS='|' read -r n st started sec note <<<"$s"
      printf '%-10s %-28s %-20s %8s  %s\n' "$n" "$st" "$started" "$sec" "$note"
    done
    echo
    echo "gpu tests: $test_line"
    if [ -s "$bench_log" ]; then
      echo
      echo "benchmark figures (bench.txt):"
      grep -E '^(device|device-to-device|projection on CUDA|scan_gpu_bench|scan path|store generated|pytorch: (same|DATA|not)|GPU vs CPU|GPU and CPU lists)' "$bench_log" | sed 's/^/  /'
      sed -n '/^    Q     k batches/,/^$/p' "$bench_log" | sed 's/^/  /'
      echo
      grep -E '^(RATIO |# (gpu_scan|sjlt_vs_dense))' "$bench_log" | sort -u
    fi
    if [ -s "$sanitizer_log" ]; then
      echo
      echo "compute-sanitizer:"
      grep -E '^(== |=========.*(ERROR SUMMARY|RACECHECK SUMMARY)|gpu_smoke:)' "$sanitizer_log" | sed 's/^/  /'
    fi
    echo
    local elapsed=$(($(date +%s) - t_start))
    if [ ${#failed_stages[@]} -eq 0 ]; then
      echo "result: PASS (${elapsed}s)"
    else
      echo "result: FAIL (${elapsed}s): ${failed_stages[*]}"
    fi
  } >"$summary"
}


# ---- 1. preflight ------------------------------------------------------------
say "== preflight (out: $out, build: $build, budget ${budget}s)"
missing=()
nvcc=""
if [ -n "${CUDACXX:-}" ]; then
  if [ -x "$CUDACXX" ]; then nvcc=$CUDACXX; else missing+=("nvcc: CUDACXX names $CUDACXX, which is not an executable"); fi
elif command -v nvcc >/dev/null 2>&1; then
  nvcc=$(command -v nvcc)
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc=/usr/local/cuda/bin/nvcc
else
  missing+=("nvcc (the CUDA compiler): not on PATH nor in /usr/local/cuda/bin")
fi
device_names=""
if ! command -v nvidia-smi >/dev/null 2>&1; then
  missing+=("no CUDA device: nvidia-smi (the NVIDIA driver's tool) is not installed")
else
  device_names=$(nvidia-smi -L 2>&1 | grep -E '^GPU [0-9]+:' || true)
  if [ -z "$device_names" ]; then
    missing+=("no CUDA device: nvidia-smi lists none ($(nvidia-smi -L 2>&1 | head -n 1))")
  fi
fi
python=${RETRACE_BENCH_PYTHON:-python3}
torch_line=$("$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.is_available())' 2>&1 | tail -n 1)

{
  echo "date: $(ts)"
  echo "host: $(uname -a)"
  echo "cores: $(nproc)"
  grep -m1 'model name' /proc/cpuinfo 2>/dev/null
  free -g 2>/dev/null | head -n 2
  echo
  echo "nvcc: ${nvcc:-missing}"; [ -n "$nvcc" ] && "$nvcc" --version 2>&1
  echo
  echo "cmake: $(cmake --version 2>&1 | head -n 1)"
  echo "ninja: $(ninja --version 2>&1 || echo missing)"
  echo "python: $python: $torch_line"
  echo "compute-sanitizer: $(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo missing)"
  echo
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,clocks.max.memory,pcie.link.gen.max --format=csv 2>&1
    echo
    nvidia-smi 2>&1
  else
    echo "nvidia-smi: missing"
  fi
} >"$env_log" 2>&1

if [ -n "$device_names" ]; then
  q=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
  cuda_driver=$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | head -n 1)
  nvcc_version=$([ -n "$nvcc" ] && "$nvcc" --version | grep -o 'release [0-9.]*' | head -n 1)
  gpu_line="$q; ${cuda_driver:-CUDA version unknown} (driver); nvcc ${nvcc_version:-missing}"
fi

if [ ${#missing[@]} -gt 0 ]; then
  for m in "${missing[@]}"; do echo "gpu-check: MISSING: $m" >&2; done
  if [ $require_gpu = 1 ]; then
    record preflight "FAILED (missing)" 0 "$(join "${missing[@]}")"
    echo "gpu-check: this machine is supposed to have a GPU (--require-gpu): stopping." >&2
    finish
  fi
  record preflight ok 0 "rehearsal without: $(join "${missing[@]}")"
else
  record preflight ok 0 "$(echo "$device_names" | head -n 1); $torch_line"
fi

# ---- 2. configure --------------------------------------------------------------
archs=${RETRACE_GPU_CHECK_CUDA_ARCHS:-}
if [ -z "$archs" ] && [ -n "$device_names" ]; then
  archs=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
fi
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
cmake_args=(-DRETRACE_KERNELS_ONLY=ON -DCMAKE_BUILD_TYPE=Release -DRETRACE_BUILD_TESTS=ON -DRETRACE_BUILD_BENCH=ON)
if [ -n "$nvcc" ]; then
  cmake_args+=(-DRETRACE_WITH_CUDA=ON "-DCMAKE_CUDA_COMPILER=$nvcc")
  [ -n "$archs" ] && cmake_args+=("-DCMAKE_CUDA_ARCHITECTURES=$archs")
else
  cmake_args+=(-DRETRACE_WITH_CUDA=OFF)
fi
run_stage configure 90 "$build_log" -- cmake -S . -B "$build" "${generator[@]}" "${cmake_args[@]}"
if [ $stage_rc -ne 0 ]; then
  record configure "$(status_of $stage_rc)" "$stage_seconds" "see build.log"
  tail -n 30 "$build_log" >&2
  finish
fi
if [ -n "$nvcc" ] && ! grep -q '^RETRACE_WITH_CUDA:BOOL=ON' "$build/CMakeCache.txt"; then
  record configure "FAILED (no CUDA)" "$stage_seconds" "the build did not enable CUDA"
  finish
fi
record configure ok "$stage_seconds" "${generator[*]:-default generator}, CUDA archs ${archs:-default}"

# ---- 3. build --------------------------------------------------------------------
jobs=$(nproc)
keep_going=()
[ ${#generator[@]} -gt 0 ] && keep_going=(-- -k 0) || keep_going=(-- -k)
run_stage build 240 "$build_log" -- cmake --build "$build" -j "$jobs" "${keep_going[@]}"
build_rc=$stage_rc
if [ $build_rc -ne 0 ]; then
  grep -E 'error|FAILED' "$build_log" | head -n 20 >&2
  record build "$(status_of $build_rc)" "$stage_seconds" "kept going; see build.log"
  timed_out $build_rc && finish
else
  record build ok "$stage_seconds" "-j $jobs"
fi

# ---- 4. ctest -L gpu ---------------------------------------------------------------
run_stage ctest 150 "$ctest_log" -- ctest --test-dir "$build" -L gpu -j 8 -V --timeout 300
ctest_rc=$stage_rc
total=$(grep -oE 'tests failed out of [0-9]+' "$ctest_log" | grep -oE '[0-9]+$' | tail -n 1)
failed_n=$(grep -oE '[0-9]+ tests failed out of' "$ctest_log" | grep -oE '^[0-9]+' | tail -n 1)
skipped=$(grep -cE '^([0-9]+: )?\[  SKIPPED \] [A-Za-z0-9_/.]+ \([0-9]+ ms\)' "$ctest_log")
not_run=$(sed -n '/The following tests did not run:/,/^$/p' "$ctest_log" | grep -cE '^\s+[0-9]+ - ')
total=${total:-0}
failed_n=${failed_n:-0}
# CTest reports a GTEST_SKIP as "Not Run (Skipped)" (gtest_discover_tests sets
# SKIP_REGULAR_EXPRESSION); older CMake counts it as passed: take the larger.
[ "$not_run" -gt "$skipped" ] && skipped=$not_run
test_line="$((total - failed_n - skipped)) passed, $failed_n failed, $skipped skipped or not run, of $total"
if timed_out $ctest_rc; then
  record ctest "$(status_of $ctest_rc)" "$stage_seconds" "$test_line"
elif [ "$total" -eq 0 ]; then
  record ctest "FAILED (no gpu tests)" "$stage_seconds" "ctest -L gpu found no test"
elif [ $ctest_rc -ne 0 ] || [ "$failed_n" -ne 0 ]; then
  grep -E '^\s*[0-9]+ - .*\(Failed|\*\*\*' "$ctest_log" | head -n 20 >&2
  record ctest "$(status_of "$([ $ctest_rc -ne 0 ] && echo $ctest_rc || echo 1)")" "$stage_seconds" "$test_line"
elif [ "$skipped" -gt 0 ] && [ $require_gpu = 1 ]; then
  grep -E 'SKIPPED|Skipped' "$ctest_log" | head -n 10 >&2
  record ctest "FAILED (tests skipped)" "$stage_seconds" "$test_line: a gpu test did not run on the device"
else
  record ctest ok "$stage_seconds" "$test_line"
fi

# ---- 5. the GPU benchmark -------------------------------------------------------------
bench_args=()
if [ -n "${RETRACE_GPU_CHECK_BENCH_ARGS:-}" ]; then
  read -r -a bench_args <<<"$RETRACE_GPU_CHECK_BENCH_ARGS"
elif [ $quick = 1 ]; then
  bench_args=(--n 60000 --subsample 20000 --reps 1)
fi
: >"$bench_log"
run_stage bench 200 "-tee:$bench_log" -- env RETRACE_BENCH_BUILD_DIR="$build" RETRACE_BENCH_SKIP_SETUP=1 \
  RETRACE_BENCH_CMAKE_ARGS="${cmake_args[*]}" bash scripts/bench.sh scan -- "${bench_args[@]}"
bench_rc=$stage_rc
ratios_missing=$(grep -cE '^# (gpu_scan_vs_d2d|gpu_scan_vs_torch|sjlt_vs_dense_p1e7_cuda) not measured' "$bench_log")
if [ $bench_rc -ne 0 ]; then
  record bench "$(status_of $bench_rc)" "$stage_seconds" "see bench.txt"
elif [ "$ratios_missing" -gt 0 ] && [ $require_gpu = 1 ]; then
  record bench "FAILED (ratios missing)" "$stage_seconds" "$ratios_missing RATIO line(s) not measured"
else
  record bench ok "$stage_seconds" "$(grep -cE '^RATIO ' "$bench_log") RATIO lines"
fi

# ---- 6. compute-sanitizer ----------------------------------------------------------------
sanitizer=$(command -v compute-sanitizer || true)
[ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
smoke="$build/bench/gpu_smoke"
for tool in memcheck racecheck; do
  if [ -z "$device_names" ]; then
    if [ $require_gpu = 1 ]; then record "$tool" "FAILED (no device)" 0 ""; else record "$tool" skipped 0 "no device"; fi
    continue
  fi
  if [ -z "$sanitizer" ]; then
    record "$tool" "FAILED (no compute-sanitizer)" 0 "not on PATH nor in /usr/local/cuda/bin"
    continue
  fi
  if [ ! -x "$smoke" ]; then
    record "$tool" "FAILED (not built)" 0 "$smoke is missing"
    continue
  fi
  echo "== $tool ($(ts)): $sanitizer --tool $tool --error-exitcode 86 $smoke" >>"$sanitizer_log"
  run_stage "$tool" 90 "$sanitizer_log" -- "$sanitizer" --tool "$tool" --error-exitcode 86 "$smoke"
  if [ $stage_rc -eq 0 ]; then
    record "$tool" ok "$stage_seconds" "gpu_smoke clean"
  elif grep -qE 'Device not supported|Unable to find injection|Target application terminated before first instrumented API call' "$sanitizer_log"; then
    record "$tool" "FAILED (cannot run here)" "$stage_seconds" "compute-sanitizer could not instrument this device (see sanitizer.log)"
  elif [ $stage_rc -eq 86 ]; then
    record "$tool" "FAILED (errors found)" "$stage_seconds" "see sanitizer.log"
  else
    record "$tool" "$(status_of $stage_rc)" "$stage_seconds" "see sanitizer.log"
  fi
done

finish
