#!/usr/bin/env bash
# Runs the fuzz targets (test/fuzz/targets/*.ts minus the helpers) with Jazzer.js, one after the other (one fuzzing
# process at a time), each for --seconds S, and ends with `N passed, N failed`: a target passes when libFuzzer ran it
# for its time without a finding. Per target it prints the executions, the peak RSS and the corpus size, and appends
# one JSON line to --results FILE if given (scripts/fuzz/campaign.sh sums them into bench-results/fuzz.json).
#   bash scripts/fuzz/run.sh [--seconds S] [--results FILE] [target...]
# Seeds: fuzz/corpus/<target>/ (committed, read only here); what the engine finds is kept in .cache/fuzz/corpus/
# (so the next run starts from it). A finding is written to fuzz/crashes/<target>-crash-<sha1> with its stack trace
# in the log: reproduce it with `bash scripts/fuzz/run.sh --repro fuzz/crashes/<file> <target>`.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

SECONDS_PER_TARGET=30
# libFuzzer's own ceiling for one input and for the process: a slower input or a larger process is a finding.
INPUT_TIMEOUT_S=30
RSS_LIMIT_MB=2048
results=""
repro=""
targets=()
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) SECONDS_PER_TARGET=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --repro) repro=$2; shift 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
# The synchronous targets (no await inside): Jazzer's faster --sync mode.
SYNC_TARGETS=" policy vhost-user "
if [ ${#targets[@]} -eq 0 ]; then
  for f in test/fuzz/targets/*.ts; do
    n=$(basename "$f" .ts)
    case $n in harness|rdma-rig|rdma-guest) continue ;; esac
    targets+=("$n")
  done
fi

build=.cache/fuzz
# Instrument the project's code only (bundle.mjs puts it in <target>.product.cjs), not the target, its test kit,
# FakeVerbs, nor packages (node_modules).
instrument=(--includes .product.cjs --excludes node_modules)
mkdir -p "$build" fuzz/crashes
passed=0
failed=0
for t in "${targets[@]}"; do
  mode=()
  [[ $SYNC_TARGETS == *" $t "* ]] && mode=(--sync)
  if ! node scripts/fuzz/bundle.mjs "$t" "$build/$t.cjs"; then
    echo "not ok - fuzz $t: the target did not build"
    failed=$((failed + 1))
    continue
  fi
  if [ -n "$repro" ]; then
    exec npx --no-install jazzer "$build/$t.cjs" "${mode[@]}" "${instrument[@]}" -- -runs=1 "$repro"
  fi
  mkdir -p "$build/corpus/$t" "fuzz/corpus/$t"
  log=$build/$t.log
  start=$(date +%s)
  load_start=$(cut -d' ' -f1 /proc/loadavg)
  # CPU seconds (user + system) of the fuzzing process: on a shared machine, inputs per CPU second compare runs
  # that wall-clock rates cannot.
  TIMEFORMAT='%U %S'
  { time npx --no-install jazzer "$build/$t.cjs" "$build/corpus/$t" "fuzz/corpus/$t" "${mode[@]}" "${instrument[@]}" --timeout=$((INPUT_TIMEOUT_S * 1000)) -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout="$INPUT_TIMEOUT_S" -rss_limit_mb="$RSS_LIMIT_MB" -print_final_stats=1 \
    -artifact_prefix="fuzz/crashes/$t-" >"$log" 2>&1; } 2>"$build/$t.time"
  rc=$?
  elapsed=$(( $(date +%s) - start ))
  load_end=$(cut -d' ' -f1 /proc/loadavg)
  cpu=$(awk '{printf "%.1f", $1 + $2}' "$build/$t.time" 2>/dev/null)
  stat() { grep -oE "^stat::$1: *[0-9]+" "$log" | grep -oE '[0-9]+$' | tail -n 1; }
  execs=$(stat number_of_executed_units)
  rss=$(stat peak_rss_mb)
  eps=$(stat average_exec_per_sec)
  corpus=$(ls "$build/corpus/$t" "fuzz/corpus/$t" 2>/dev/null | grep -vc ':$')
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1)
  if [ "$rc" -eq 0 ] && [ -n "$execs" ]; then
    passed=$((passed + 1))
    echo "ok - fuzz $t: ${execs} inputs in ${elapsed} s (${eps}/s while fuzzing, ${cpu} CPU s), peak RSS ${rss} MB, ${cov:-no coverage line}, corpus ${corpus}"
    crash=0
    finding=""
  else
    failed=$((failed + 1))
    echo "not ok - fuzz $t: exit $rc after ${execs:-?} inputs; log $log:"
    grep -E 'Uncaught|Error|ERROR|Test unit written|SUMMARY' "$log" | head -n 20 | sed 's/^/    /'
    crash=1
    finding=$(grep -m 1 -E 'Error|ERROR|Uncaught' "$log" | tr -d '"\\\000-\037' | cut -c1-200)
  fi
  if [ -n "$results" ]; then
    printf '{"target":"%s","seconds":%s,"executions":%s,"exec_per_s":%s,"cpu_s":%s,"peak_rss_mb":%s,"crashes":%s,"finding":"%s","corpus":%s,"coverage":"%s","load":[%s,%s]}\n' \
      "$t" "$elapsed" "${execs:-0}" "${eps:-0}" "${cpu:-0}" "${rss:-0}" "$crash" "$finding" "$corpus" "${cov}" "$load_start" "$load_end" >>"$results"
  fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
