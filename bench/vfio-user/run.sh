#!/usr/bin/env bash
# The control round trip over vfio-user (stock QEMU) vs vhost-user (the project's QEMU), same run, and the cost of
# one trapped doorbell; writes bench-results/vfio-user.json (bench.ts says what each record is).
#   VRDMA_BENCH_ITERS   round trips per transport (default 300)
# --data-path: instead, the relayed data path (RDMA WRITE latency and 64 KiB bandwidth between two VMs on rxe0)
# over vfio-user vs vhost-user in one soft-RoCE test-host run (data-path.ts); adds its records to the same file.
#   VRDMA_BENCH_ROUNDS, VRDMA_BENCH_LAT_ITERS, VRDMA_BENCH_BW_ITERS   sizes of that run
set -euo pipefail
cd "$(dirname "$0")/../.."
# Boot (about a minute under TCG), four QEMUs and two rounds on a loaded 2-core machine; this bounds a hung run.
DATA_PATH_TIMEOUT_S=1200
if [ "${1:-}" != --data-path ]; then
  exec npx --no-install tsx bench/vfio-user/bench.ts
fi
if [ "${VRDMA_IN_TEST_HOST:-}" = 1 ]; then
  # tsx as an import hook of node itself: one process inside the VM.
  exec node --import tsx/esm bench/vfio-user/data-path.ts
fi
# Both QEMUs found (and installed or built when missing) out here: the test host's root is read-only.
VRDMA_QEMU=$(bash scripts/qemu/build.sh | tail -n 1)
VRDMA_STOCK_QEMU=$(bash scripts/vfio-user/stock-qemu.sh | tail -n 1)
export VRDMA_QEMU VRDMA_STOCK_QEMU
exec bash scripts/rxe/run.sh --timeout "$DATA_PATH_TIMEOUT_S" --bench-results -- bash bench/vfio-user/run.sh --data-path
