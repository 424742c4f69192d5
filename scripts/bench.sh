#!/usr/bin/env bash
# Builds the benchmarks (Release, in build-bench/) and runs them.
#   scripts/bench.sh                          every benchmark
#   scripts/bench.sh projection               the named ones
#   scripts/bench.sh projection -- --benchmark_filter=sjlt   arguments for the binaries
#   scripts/bench.sh scan -- --n 20000 --queries 1,8     a smaller scan store
#   scripts/bench.sh server --shards 4        also the store behind a router and
#                                             4 shards (RATIO router_p99_vs_single)
#   scripts/bench.sh soak                     retraced under mixed valid and
#                                             invalid traffic, RSS per minute
#                                             (scripts/soak.sh; only when named,
#                                             10 min, RETRACE_SOAK_MINUTES)
# Each benchmark NAME is the executable NAME_bench (bench/CMakeLists.txt);
# `scan` runs scan_bench twice (an fp16 store, then a bf16 one) and also
# scan_gpu_bench: the GPU scan against the device's copy
# bandwidth, PyTorch on the device and the CPU backend (on a machine without a
# device it prints why and skips; in a kernels-only build, without LibTorch,
# it is the only scan program). They print `RATIO <name> <value>` lines (the performance targets,
# docs/benchmarks.md); these are collected and printed together at the end. Full
# outputs are kept in build-bench/results/NAME.txt.
# The featurize benchmark also runs a TorchScript model: the script exports
# examples/pytorch_ddpm/model.py's untrained UNet into
# build-bench/bench_models/ and passes it in RETRACE_BENCH_TORCHSCRIPT.
# Environment: RETRACE_BENCH_BUILD_DIR (default build-bench),
# RETRACE_BENCH_CMAKE_ARGS (e.g. -DRETRACE_KERNELS_ONLY=ON on a GPU machine
# without gRPC and LibTorch; scripts/setup.sh, which installs the full build's
# Debian packages, is then not run), RETRACE_BENCH_SKIP_SETUP=1 (never run it).
set -euo pipefail
cd "$(dirname "$0")/.."

# Every known benchmark; add a NAME here and a retrace_add_bench(NAME_bench ...)
# line in bench/CMakeLists.txt.
all=(projection scan featurize server)
# Named only: not part of a plain run (it takes ten minutes).
extra=(soak)

usage() {
  echo "usage: scripts/bench.sh [NAME...] [--shards N] [-- benchmark args]   (NAME: ${all[*]} ${extra[*]})" >&2
  echo "  --shards N   server: also serve the store from N shards behind a router (RATIO router_p99_vs_single)" >&2
}

names=()
bench_args=()
server_args=()  # --shards n: server_bench only
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --shards) [ $# -ge 2 ] || { usage; exit 2; }
              server_args+=(--shards "$2"); shift 2 ;;
    --) shift; bench_args=("$@"); break ;;
    -*) usage; exit 2 ;;
    *) names+=("$1"); shift ;;
  esac
done
[ ${#names[@]} -eq 0 ] && names=("${all[@]}")
for n in "${names[@]}"; do
  if [[ ! " ${all[*]} ${extra[*]} " =~ " ${n} " ]]; then
    echo "bench.sh: unknown benchmark '$n'" >&2
    usage
    exit 2
  fi
done

if [[ "${RETRACE_BENCH_SKIP_SETUP:-0}" != 1 &&
      " ${RETRACE_BENCH_CMAKE_ARGS:-} " != *" -DRETRACE_KERNELS_ONLY=ON "* ]]; then
  bash scripts/setup.sh
fi

build_dir=${RETRACE_BENCH_BUILD_DIR:-build-bench}
# Ninja for a new build folder (where it is installed); an existing one keeps
# its generator (scripts/gpu-check.sh shares its build folder).
generator=()
if [ ! -f "$build_dir/CMakeCache.txt" ] && command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
fi
# shellcheck disable=SC2086  # RETRACE_BENCH_CMAKE_ARGS is a list of words
cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DRETRACE_BUILD_TESTS=OFF -DRETRACE_BUILD_BENCH=ON ${RETRACE_BENCH_CMAKE_ARGS:-} >/dev/null

# The programs of benchmark NAME that this configuration builds (a kernels-only
# build has no LibTorch, hence no scan_bench).
known_targets=$(cmake --build "$build_dir" --target help | sed -n 's/^\(\.\.\. \)\{0,1\}\([A-Za-z0-9_]*\)[: ].*/\2/p')
programs_of() {
  if [ "$1" = soak ]; then
    echo retraced; echo retrace-batch; echo retrace; echo retrace_python_stubs
    return
  fi
  local candidates=("$1_bench")
  [ "$1" = scan ] && candidates+=(scan_gpu_bench)
  for t in "${candidates[@]}"; do
    if grep -qx "$t" <<<"$known_targets"; then echo "$t"; fi
  done
}
targets=()
for n in "${names[@]}"; do
  mapfile -t progs < <(programs_of "$n")
  if [ ${#progs[@]} -eq 0 ]; then
    echo "bench.sh: benchmark '$n' is not built in this configuration (${RETRACE_BENCH_CMAKE_ARGS:-default})" >&2
    exit 1
  fi
  targets+=("${progs[@]}")
done
cmake --build "$build_dir" -j "$(nproc)" --target "${targets[@]}"

results="$build_dir/results"
mkdir -p "$results"

# The featurize benchmark's TorchScript case runs the example's untrained
# 32x32 RGB UNet, exported with Debian's python3-torch (skipped without it).
if [[ " ${names[*]} " =~ " featurize " ]]; then
  ts_model="$build_dir/bench_models/pytorch_ddpm_untrained.ts.pt"
  mkdir -p "$(dirname "$ts_model")"
  if /usr/bin/python3 examples/pytorch_ddpm/model.py --export "$ts_model" --seed 0; then
    export RETRACE_BENCH_TORCHSCRIPT="$ts_model"
  else
    echo "bench.sh: could not export the TorchScript example model; its cases skip" >&2
  fi
fi
ratios=()
failed=()
for n in "${names[@]}"; do
  : >"$results/$n.txt"
  if [ "$n" = soak ]; then
    echo "== soak ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    bash scripts/soak.sh --build-dir "$build_dir" \
      --minutes "${RETRACE_SOAK_MINUTES:-10}" 2>&1 | tee -a "$results/soak.txt" ||
      failed+=(soak)
    continue
  fi
  mapfile -t progs < <(programs_of "$n")
  for prog in "${progs[@]}"; do
    echo "== $n: $prog ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    extra_args=()
    [ "$prog" = server_bench ] && extra_args=("${server_args[@]}")
    if ! "$build_dir/bench/$prog" --benchmark_color=false "${extra_args[@]}" "${bench_args[@]}" 2>&1 |
        tee -a "$results/$n.txt"; then
      failed+=("$prog")
    fi
    # The scan again on a bf16 store, the type the AMX matrix unit reads as
    # stored (RATIO cpu_scan_bf16_*; on a CPU without AMX, the AVX-512 path).
    if [ "$prog" = scan_bench ]; then
      echo "== $n: $prog --dtype bf16 ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
      if ! "$build_dir/bench/$prog" --benchmark_color=false "${bench_args[@]}" \
          --dtype bf16 --torch-reps 0 --isas auto,avx512 2>&1 | tee -a "$results/$n.txt"; then
        failed+=("$prog --dtype bf16")
      fi
    fi
  done
  while IFS= read -r line; do ratios+=("$line"); done < <(grep -o 'RATIO .*' "$results/$n.txt" || true)
done

echo "== ratios"
for r in "${ratios[@]}"; do echo "$r"; done
if [ ${#failed[@]} -gt 0 ]; then
  echo "bench.sh: failed: ${failed[*]}" >&2
  exit 1
fi
