#!/usr/bin/env bash
# npm run bench:doorbell: the doorbell engine's wake modes (bench/doorbell/bench.ts) on rxe0, inside the soft-RoCE
# test host (started here; bench-results/ is shared with it read-write). Writes bench-results/doorbell.json; the
# figures are only meaningful as ratios and differences within one run.
set -euo pipefail
source "$(dirname "$0")/../common/test-host.sh"
# Boot (about a minute under TCG) and 6 cases of 300 samples with JavaScript on the guest side: a few minutes.
BENCH_TIMEOUT_SECONDS=900
bench_exec_in_test_host bench/doorbell/bench.ts
bash scripts/setup.sh >&2
# The machine's load when the VM starts, recorded beside the figures (TCG speed follows it).
VRDMA_BENCH_HOST_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
export VRDMA_BENCH_HOST_LOAD
bench_start_test_host "$BENCH_TIMEOUT_SECONDS" bench/doorbell/run.sh
