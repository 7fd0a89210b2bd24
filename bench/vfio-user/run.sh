#!/usr/bin/env bash
# The control round trip over vfio-user (stock QEMU) vs vhost-user (the project's QEMU), same run, and the cost of
# one trapped doorbell; writes bench-results/vfio-user.json (bench.ts says what each record is).
#   VRDMA_BENCH_ITERS   round trips per transport (default 300)
set -euo pipefail
cd "$(dirname "$0")/../.."
exec npx --no-install tsx bench/vfio-user/bench.ts
