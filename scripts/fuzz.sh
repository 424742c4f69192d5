#!/usr/bin/env bash
# Builds the fuzz targets with clang's libFuzzer, AddressSanitizer and
# UndefinedBehaviorSanitizer in build-fuzz/ and runs a campaign:
#   scripts/fuzz.sh [--seconds S] [--jobs J] [TARGET...]
# Each target runs S seconds (default 1200) on a working corpus in
# build-fuzz/campaign/<target>/ that starts from its seed corpus
# (tests/fuzz/corpus/<target>/) and keeps what libFuzzer finds; J targets run
# at once (default: the number of cores). Crashes are written as
# build-fuzz/campaign/<target>/crash-*; each target's log ends with
# libFuzzer's final statistics (executions, coverage). Without TARGET, all.
# A summary line per target goes to build-fuzz/campaign/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=1200
jobs=$(nproc)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  targets=(image_decode_fuzz attribute_request_fuzz store_headers_fuzz
           model_description_fuzz retraced_config_fuzz page_token_fuzz)
fi

bash scripts/setup.sh
if ! command -v clang++ >/dev/null || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get install -y -qq --no-install-recommends clang libclang-rt-dev >/dev/null
fi

export CC=clang CXX=clang++
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DRETRACE_FUZZ=ON -DRETRACE_SANITIZE=address,undefined \
  -DRETRACE_WITH_CUDA=OFF -DRETRACE_BUILD_BENCH=OFF >/dev/null
cmake --build build-fuzz -j "$(nproc)" --target "${targets[@]}"

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
campaign=build-fuzz/campaign
mkdir -p "$campaign"
run_one() {
  local target=$1 work=$campaign/$1
  mkdir -p "$work/corpus"
  cp -n tests/fuzz/corpus/"$target"/* "$work/corpus/" 2>/dev/null || true
  local binary
  binary=$(find build-fuzz/tests/fuzz -maxdepth 1 -name "$target" -type f)
  (cd "$work" && "../../../$binary" -max_total_time="$seconds" -timeout=20 \
     -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
     -artifact_prefix=./ corpus > log.txt 2>&1) || true
  local execs cov crashes
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/log.txt" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "$work/log.txt" | tail -1 | grep -o '[0-9]*' || echo "?")
  crashes=$(find "$work" -maxdepth 1 -name 'crash-*' -o -maxdepth 1 -name 'leak-*' -o -maxdepth 1 -name 'timeout-*' -o -maxdepth 1 -name 'oom-*' | wc -l)
  echo "$target seconds=$seconds executions=$execs coverage=$cov corpus=$(ls "$work/corpus" | wc -l) findings=$crashes" | tee -a "$campaign/summary.txt"
}
export -f run_one
export campaign seconds
printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one {}'
