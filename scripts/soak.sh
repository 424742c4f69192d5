#!/usr/bin/env bash
# The soak: retraced under mixed valid and invalid traffic for a long time,
# its resident memory sampled each minute (scripts/bench.sh soak runs this).
#   scripts/soak.sh [--build-dir DIR] [--minutes M] [--threads T]
# Uses the binaries and Python stubs in DIR (default build-bench); makes the
# quick demo's store and model there once (scripts/demo.sh --quick), serves
# them with limits below the traffic (--max-concurrent 8, --max-queue 32,
# 1 MiB messages) and runs tests/server/retraced/abuse_client.py for M minutes
# (default 10; the mix is described there). Writes DIR/results/soak.json and
# prints the RSS table; exit status 1 when any answer was wrong, any code
# unexpected, or retraced exited or did not drain on SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."

build=build-bench
minutes=10
threads=8
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "usage: scripts/soak.sh [--build-dir DIR] [--minutes M] [--threads T]" >&2; exit 2 ;;
  esac
done

demo=${RETRACE_SOAK_DEMO_DIR:-$build/soak-demo}
if [ ! -f "$demo/store/manifest.json" ]; then
  RETRACE_BUILD_DIR=$build RETRACE_DEMO_DIR=$demo \
    bash scripts/demo.sh --quick --fresh --no-build >"$build/soak-demo.log" 2>&1 ||
    { echo "soak: making the demo store failed (see $build/soak-demo.log)" >&2; exit 1; }
fi
mkdir -p "$build/results"
run=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$run"' EXIT
"$build/server/retraced/retraced" --store "$demo/store" --model "$demo/run" \
  --listen 127.0.0.1:0 --port-file "$run/port" --metrics-port -1 \
  --max-concurrent 8 --max-queue 32 --max-message-bytes 1048576 \
  2>"$run/retraced.log" &
pid=$!
for _ in $(seq 600); do
  [ -s "$run/port" ] && break
  sleep 0.1
done
[ -s "$run/port" ] || { echo "soak: retraced did not start" >&2; cat "$run/retraced.log" >&2; exit 1; }
echo "soak: retraced pid $pid on port $(cat "$run/port"), $minutes min, $threads clients ($(date -u +%Y-%m-%dT%H:%M:%SZ), load $(cut -d' ' -f1-3 /proc/loadavg))"
status=0
/usr/bin/python3 tests/server/retraced/abuse_client.py \
  --address "127.0.0.1:$(cat "$run/port")" --pid "$pid" --shape 1,28,28 \
  --pb-dir "$build/client/python" --seconds "$((minutes * 60))" \
  --threads "$threads" --burst 8 --rss-interval 60 \
  --max-message-bytes 1048576 --report "$build/results/soak.json" || status=1
kill -TERM "$pid"
if ! wait "$pid"; then
  echo "soak: retraced did not exit 0 after SIGTERM" >&2
  status=1
fi
exit $status
