#!/usr/bin/env bash
# npm run bench:verbs: RDMA WRITE latency and bandwidth through HostVerbs vs perftest on rxe0, inside the soft-RoCE
# test host (started here; bench-results/ is shared with it read-write). Writes bench-results/verbs.json.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# A whole run (3 rounds of both tests under TCG) takes a few minutes; this bounds a hung one.
BENCH_TIMEOUT_SECONDS=2400
if [ "${VRDMA_IN_TEST_HOST:-}" = 1 ]; then
  exec npx tsx bench/verbs/bench.ts
fi
bash scripts/setup.sh
exec bash scripts/rxe/run.sh --timeout "$BENCH_TIMEOUT_SECONDS" --bench-results -- bash bench/verbs/run.sh
