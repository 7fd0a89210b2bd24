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
  npx --no-install jazzer "$build/$t.cjs" "$build/corpus/$t" "fuzz/corpus/$t" "${mode[@]}" "${instrument[@]}" --timeout=$((INPUT_TIMEOUT_S * 1000)) -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout="$INPUT_TIMEOUT_S" -rss_limit_mb="$RSS_LIMIT_MB" -print_final_stats=1 \
    -artifact_prefix="fuzz/crashes/$t-" >"$log" 2>&1
  rc=$?
  elapsed=$(( $(date +%s) - start ))
  stat() { grep -oE "^stat::$1: *[0-9]+" "$log" | grep -oE '[0-9]+$' | tail -n 1; }
  execs=$(stat number_of_executed_units)
  rss=$(stat peak_rss_mb)
  corpus=$(ls "$build/corpus/$t" "fuzz/corpus/$t" 2>/dev/null | grep -vc ':$')
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1)
  if [ "$rc" -eq 0 ] && [ -n "$execs" ]; then
    passed=$((passed + 1))
    echo "ok - fuzz $t: ${execs} inputs in ${elapsed} s, peak RSS ${rss} MB, ${cov:-no coverage line}, corpus ${corpus}"
    crash=0
  else
    failed=$((failed + 1))
    echo "not ok - fuzz $t: exit $rc after ${execs:-?} inputs; log $log:"
    grep -E 'Uncaught|Error|ERROR|Test unit written|SUMMARY' "$log" | head -n 20 | sed 's/^/    /'
    crash=1
  fi
  if [ -n "$results" ]; then
    printf '{"target":"%s","seconds":%s,"executions":%s,"peak_rss_mb":%s,"crashes":%s,"corpus":%s,"coverage":"%s"}\n' \
      "$t" "$elapsed" "${execs:-0}" "${rss:-0}" "$crash" "$corpus" "${cov}" >>"$results"
  fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
