#!/usr/bin/env bash
# npm run bench:vpc: connection setup through the device with the VPC policy (1,000 rules) vs without, and the time
# from a rule change to both QPs in ERR, inside the soft-RoCE test host (started here; bench-results/ is shared
# with it read-write). Writes bench-results/vpc.json.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# A whole run (10 rounds of setup, 5 teardowns per control plane, under TCG) takes a few minutes; this bounds a
# hung one.
BENCH_TIMEOUT_SECONDS=2400
if [ "${VRDMA_IN_TEST_HOST:-}" = 1 ]; then
  exec npx tsx bench/vpc/bench.ts
fi
bash scripts/setup.sh
exec bash scripts/rxe/run.sh --timeout "$BENCH_TIMEOUT_SECONDS" --bench-results -- bash bench/vpc/run.sh
