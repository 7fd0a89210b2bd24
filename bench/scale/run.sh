#!/usr/bin/env bash
# npm run bench:scale: mapped-mode QPs per VM at scale (issue 11 item 8). Two VMs through the reference vhost-user
# front-end with HOST_QUEUE_MAPPING on rxe0, each creating N mapped RC QPs, connected pairwise A<->B, one RDMA
# WRITE with a byte check on a sample, then destroyed; the same set-up straight on native verbs in the same run.
# Runs inside the soft-RoCE test host (started here; bench-results/ is shared with it read-write). Writes
# bench-results/scale.json.
#   VRDMA_BENCH_SCALE_QPS=16384        QPs per VM (the last step)
#   VRDMA_BENCH_SCALE_STEPS=256,1024   smaller steps run first in the same run (default: none)
#   VRDMA_BENCH_SCALE_QPS_PER_CQ=16    mapped QPs sharing one mapped CQ (bench.ts says why they share)
#   VRDMA_BENCH_SCALE_SAMPLE=512       one WRITE with a byte check on every this-many-th pair (and the last)
#   VRDMA_BENCH_SCALE_BUDGET_S         stop creating QPs of a step after this many seconds (then connect what
#                                      exists, sample, destroy, record the N reached): keeps a run inside its VM time
#   VRDMA_BENCH_SCALE_DEADLINE         Unix seconds: a step stops creating when its teardown would not fit before
#   VRDMA_BENCH_SCALE_TIMEOUT_S=7200   the test host's time limit (boot included)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
if [ "${VRDMA_IN_TEST_HOST:-}" = 1 ]; then
  # The bench process holds both VMs' front-ends, so its mappings are 2 per mapped QP and 1 per mapped CQ for both
  # VMs: above Linux's default vm.max_map_count (65,530) at 16,384 QPs per VM. The test host is a throw-away VM.
  if [ -w /proc/sys/vm/max_map_count ]; then echo 1048576 >/proc/sys/vm/max_map_count; fi
  # tsx as an import hook of node itself (one process); --expose-gc so the memory figures are taken after a GC.
  exec node --expose-gc --import tsx/esm bench/scale/bench.ts
fi
# Under TCG a mapped connection through the device costs ~0.2 s of JavaScript per QP (bench:rdma's setup rows):
# 2 x 16,384 QPs need hours. This bounds the whole run; VRDMA_BENCH_SCALE_BUDGET_S stops a step cleanly before.
timeout_s=${VRDMA_BENCH_SCALE_TIMEOUT_S:-7200}
bash scripts/setup.sh >&2
# The host's own load while the test host runs (the test host sees only its own): machine conditions in the record.
VRDMA_BENCH_HOST_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
VRDMA_BENCH_HOST_CPUS=$(nproc)
export VRDMA_BENCH_HOST_LOAD VRDMA_BENCH_HOST_CPUS
exec bash scripts/rxe/run.sh --timeout "$timeout_s" --bench-results -- bash bench/scale/run.sh
