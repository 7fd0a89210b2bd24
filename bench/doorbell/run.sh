#!/usr/bin/env bash
# npm run bench:doorbell: the doorbell engine's wake modes (bench/doorbell/bench.ts) on rxe0, inside the soft-RoCE
# test host (started here; bench-results/ is shared with it read-write). Writes bench-results/doorbell.json; the
# figures are only meaningful as ratios and differences within one run.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# Boot (about a minute under TCG) and 6 cases of 300 samples with JavaScript on the guest side: a few minutes.
BENCH_TIMEOUT_SECONDS=900
if [ "${VRDMA_IN_TEST_HOST:-}" = 1 ]; then
  exec node --import tsx/esm bench/doorbell/bench.ts
fi
bash scripts/setup.sh >&2
# The machine's load when the VM starts, recorded beside the figures (TCG speed follows it).
VRDMA_BENCH_HOST_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
export VRDMA_BENCH_HOST_LOAD
exec bash scripts/rxe/run.sh --timeout "$BENCH_TIMEOUT_SECONDS" --bench-results -- bash bench/doorbell/run.sh
