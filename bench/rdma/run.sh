#!/usr/bin/env bash
# npm run bench:rdma: the virtio-rdma device end to end (QP set-up, RDMA WRITE latency and 64 KiB bandwidth,
# SEND/RECV latency between two VMs) vs native verbs and perftest on the same rxe0, inside the soft-RoCE test
# host (started here; bench-results/ is shared with it read-write). Writes bench-results/rdma.json.
#   VRDMA_BENCH_TRANSPORTS=qemu,frontend,mapped   what to measure (default all three; mapped = host queue mapping
#                                                 through the front-end, C loop and JavaScript driver)
#   VRDMA_BENCH_JS_ITERS   iterations of the JavaScript driver's mapped loops
#   VRDMA_BENCH_ROUNDS, VRDMA_BENCH_SETUP_ITERS, VRDMA_BENCH_LAT_ITERS, VRDMA_BENCH_BW_ITERS   sizes of the run
set -euo pipefail
source "$(dirname "$0")/../common/test-host.sh"
# Boot (about a minute under TCG), two QEMU VMs, 3 rounds of every test for both transports and perftest: about
# 20 minutes on a loaded 2-core machine; this bounds a hung run.
BENCH_TIMEOUT_SECONDS=2400
bench_exec_in_test_host bench/rdma/bench.ts
bash scripts/setup.sh >&2
# The mapped rows' guest loop in C (bench code only, its own addon; the test host sees this tree at the same path).
(cd bench/rdma/native && npx --no-install node-gyp rebuild --nodedir=/usr --loglevel=warn) >&2
VRDMA_QEMU=$(bash scripts/qemu/build.sh | tail -n 1)
[ -x "$VRDMA_QEMU" ] || { echo "[bench:rdma] scripts/qemu/build.sh gave no QEMU binary ($VRDMA_QEMU)" >&2; exit 1; }
export VRDMA_QEMU
bench_start_test_host "$BENCH_TIMEOUT_SECONDS" bench/rdma/run.sh
