#!/usr/bin/env bash
# Runs one fuzz target for a bounded time on its seed corpus:
#   run_fuzzer.sh TARGET CORPUS_DIR NEW_DIR SECONDS
# NEW_DIR (emptied first) is where libFuzzer writes the inputs it finds; the
# seed corpus is only read. The same flags work for the libFuzzer build and
# for driver.cc, which ignores the ones it does not know.
set -euo pipefail
target=$1 corpus=$2 new=$3 seconds=$4
rm -rf "$new"
mkdir -p "$new"
cd "$new"
exec "$target" -max_total_time="$seconds" -seed=1 -timeout=20 \
  -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 "$new" "$corpus"
