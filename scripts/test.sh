#!/usr/bin/env bash
# The project's test command (`npm test`): set up what is missing, type-check, run every test with tap,
# and end with the plain line `N passed, N failed` that CI reads.
# Arguments, if any, are test files or folders to run instead of the whole suite.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash scripts/setup.sh || { echo "setup failed"; echo "0 passed, 1 failed"; exit 1; }

passed=0; failed=0; skipped=0
if npx tsc -p tsconfig.json --noEmit; then passed=$((passed + 1)); echo "ok - typecheck"; else failed=$((failed + 1)); echo "not ok - typecheck"; fi

if [ "$#" -gt 0 ]; then targets=("$@"); else targets=(test); fi
log=$(mktemp)
npx tap "${targets[@]}" 2>&1 | tee "$log"
# tap closes with `# { total: N, pass: N, fail: N, skip: N, ... }`; missing keys mean zero.
summary=$(grep -E '^# \{ total:' "$log" | tail -n 1)
get() { printf '%s' "$summary" | grep -oE "$1: [0-9]+" | grep -oE '[0-9]+' || echo 0; }
if [ -z "$summary" ]; then
  failed=$((failed + 1)); echo "tap printed no summary (crashed?)"
else
  passed=$((passed + $(get pass)))
  failed=$((failed + $(get fail)))
  skipped=$((skipped + $(get skip) + $(get todo)))
fi
rm -f "$log"
if [ "$skipped" -gt 0 ]; then echo "$passed passed, $failed failed, $skipped skipped"; else echo "$passed passed, $failed failed"; fi
[ "$failed" -eq 0 ]
