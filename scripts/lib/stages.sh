# Stages of a bounded check script (scripts/gpu-check.sh, scripts/gpu-node-check.sh):
# each stage runs under a time cap within the script's overall budget, and its
# result is recorded in order and written to the summary as it goes.
#
# The sourcing script sets, before calling anything here:
#   stage_tool   name printed by `say`
#   deadline     epoch seconds at which the budget is spent
#   cap_scale    (optional, default 1) multiplier of every stage cap
# and defines write_summary, which prints the `stages` entries
# ("name|status|started|seconds|note") and `failed_stages`.

ts() { date -u +%Y-%m-%dT%H:%M:%SZ; }
say() { echo "[$(ts)] $stage_tool: $*"; }
join() { local IFS=$'\n'; sed ':a;N;$!ba;s/\n/; /g' <<<"$*"; }

# Stage results, in order: "name|status|started|seconds|note".
stages=()
failed_stages=()
stage_started=""
record() {  # name status seconds note
  stages+=("$1|$2|${stage_started:-$(ts)}|$3|$4")
  stage_started=""
  [ "$2" = ok ] || [ "$2" = skipped ] || failed_stages+=("$1")
  say "stage $1: $2 (${3}s)${4:+ - $4}"
  write_summary
}

# run_stage NAME CAP_SECONDS LOG -- command...: runs the command with its
# output appended to LOG (and shown too when LOG is "-tee:<file>"), within
# min(CAP × cap_scale, what is left of the budget); with under 5 s left it
# does not run (stage_rc 125). Sets stage_rc and stage_seconds.
stage_rc=0
stage_seconds=0
run_stage() {
  local name=$1 cap=$2 log=$3
  shift 4
  cap=$((cap * ${cap_scale:-1}))
  local left=$((deadline - $(date +%s)))
  local limit=$((cap < left ? cap : left))
  stage_seconds=0
  stage_started=$(ts)
  if [ "$limit" -lt 5 ]; then
    stage_rc=125
    return
  fi
  say "== $name (limit ${limit}s)"
  local tee=0
  if [[ "$log" == -tee:* ]]; then
    log=${log#-tee:}
    tee=1
  fi
  echo "== [$(ts)] $name: $(head -n 1 <<<"$*" | cut -c 1-400)" >>"$log"
  local t0
  t0=$(date +%s)
  if [ "$tee" = 1 ]; then
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    stage_rc=${PIPESTATUS[0]}
  else
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    stage_rc=$?
  fi
  stage_seconds=$(($(date +%s) - t0))
}

status_of() {  # rc -> status text
  case "$1" in
    0) echo ok ;;
    124|137) echo "FAILED (time limit)" ;;
    125) echo "NOT RUN (time budget spent)" ;;
    *) echo "FAILED (exit $1)" ;;
  esac
}

timed_out() { [ "$1" -eq 124 ] || [ "$1" -eq 125 ] || [ "$1" -eq 137 ]; }

finish() {
  write_summary
  echo
  cat "$summary"
  [ ${#failed_stages[@]} -eq 0 ] && exit 0
  exit 1
}
