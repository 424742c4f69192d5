#!/usr/bin/env bash
# End to end with a model retrace did not train: examples/pytorch_ddpm.
#
#   own_model_pytorch_e2e.sh RETRACE_BATCH RETRACED RETRACE WORK_DIR
#
# 1. train.py trains the example PyTorch DDPM on 160 synthetic shapes and
#    writes model.toml (reused when WORK_DIR/model holds the output of the same
#    options and code);
# 2. retrace-batch build-store --model builds a D = 4096 store from it;
# 3. retraced --model serves it on a free port;
# 4. check_full_gradients.py asks for every sample's TracIn and ReTrac score of
#    12 held-out images (retrace query --json --k N) and compares the store's
#    norms and the served scores with full-dimensional gradients it computes
#    itself (independent Philox, loss and projection);
# 5. retraced is stopped with SIGTERM and must exit 0.
set -euo pipefail

if [[ $# -ne 4 ]]; then
  echo "usage: $0 RETRACE_BATCH RETRACED RETRACE WORK_DIR" >&2
  exit 2
fi
retrace_batch=$1 retraced=$2 retrace=$3 work=$4
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
example=$here/../../examples/pytorch_ddpm
python=${RETRACE_PYTHON-/usr/bin/python3}
if [[ -z "$python" ]]; then
  echo "skipped: no Python 3.11+ with torch and numpy was found at configure time"
  exit 77
fi
threads=${RETRACE_TEST_THREADS:-2}
export OMP_WAIT_POLICY=PASSIVE

mkdir -p "$work"
start=$SECONDS
stamp() { echo "[$((SECONDS - start)) s] $*"; }

stamp "train.py (reused when unchanged)"
"$python" "$example/train.py" --out "$work/model" --reuse --steps 300 \
  --images-per-class 40 --checkpoints 2 --queries 3 --seed 0 \
  --threads "$threads"

stamp "retrace-batch build-store --dim 4096"
rm -rf "$work/store"
"$retrace_batch" build-store --model "$work/model/model.toml" \
  --out "$work/store" --dim 4096 --buckets 10 --store-seed 11 --proj-seed 5 \
  --samples-per-shard 64 --threads "$threads" --quiet

stamp "retraced"
rm -f "$work/retraced.port"
"$retraced" --store "$work/store" --model "$work/model/model.toml" \
  --listen 127.0.0.1:0 --port-file "$work/retraced.port" --metrics-port -1 \
  >"$work/retraced.log" 2>&1 &
server_pid=$!
cleanup() {
  if kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  [[ -s "$work/retraced.port" ]] && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "retraced exited at start-up:" >&2
    cat "$work/retraced.log" >&2
    exit 1
  fi
  sleep 0.2
done
if [[ ! -s "$work/retraced.port" ]]; then
  echo "retraced wrote no port file within 120 s" >&2
  exit 1
fi
port=$(cat "$work/retraced.port")
# retraced listens (answering UNAVAILABLE) while it loads the store and the
# model; queries wait until the health check says SERVING.
for _ in $(seq 1 600); do
  "$retrace" health --server "127.0.0.1:$port" >/dev/null 2>&1 && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "retraced exited while loading:" >&2
    cat "$work/retraced.log" >&2
    exit 1
  fi
  sleep 0.5
done
"$retrace" health --server "127.0.0.1:$port"
stamp "retraced serving on port $port"

stamp "check_full_gradients.py"
"$python" "$example/check_full_gradients.py" --model "$work/model/model.toml" \
  --store "$work/store" --server "127.0.0.1:$port" --retrace "$retrace" \
  --queries "$work"/model/queries/*.png --seed 7 --query-timesteps 2 \
  --noise-draws 4 --threads "$threads"

stamp "stopping retraced (SIGTERM)"
kill -TERM "$server_pid"
rc=0
wait "$server_pid" || rc=$?
trap - EXIT
if [[ $rc -ne 0 ]]; then
  echo "retraced exited $rc after SIGTERM, expected 0:" >&2
  tail -20 "$work/retraced.log" >&2
  exit 1
fi
stamp "passed"
