#!/usr/bin/env bash
# The long fuzzing campaign (`npm run fuzz -- --seconds S [target...]` runs the same targets briefly): every target for
# S seconds (default 900), one fuzzing process at a time at the lowest priority (a shared machine), then
# bench-results/fuzz.json with the figures of this run and the earlier runs of the same targets (summarize.mjs):
# executions, exec/s, inputs per CPU second, crashes, peak RSS and coverage per target, the totals, and the time the
# 10^7-input goal takes at these rates.
#   bash scripts/fuzz/campaign.sh [--seconds S] [target...]
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
seconds=900
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) seconds=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
lines=$(mktemp)
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# Runs accumulate over campaigns of the same fuzz targets (git's tree hash of test/fuzz/targets): a change to a
# target or to the rig starts the count again.
targets_tree=$(git rev-parse --short HEAD:test/fuzz/targets 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain -- test/fuzz/targets 2>/dev/null)" ] && targets_tree="$targets_tree+dirty"
nice -n 19 bash scripts/fuzz/run.sh --seconds "$seconds" --results "$lines" "${args[@]}"
rc=$?
mkdir -p bench-results
node scripts/fuzz/summarize.mjs "$lines" "$started" "$targets_tree" bench-results/fuzz.json
rm -f "$lines"
exit $rc
