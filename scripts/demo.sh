#!/usr/bin/env bash
# `npm run demo`: the main job end to end from a fresh clone. Sets up (apt packages, npm ci, native addon), builds
# or reuses the cached patched QEMU, boots the soft-RoCE test host and runs scripts/demo.ts inside it: the back-end
# with two VMs (two real QEMU processes), an RC ping-pong and an RDMA WRITE/READ exchange, and a table of what
# happened. Exit code: the demo's (non-zero when any check fails); 124 when the test host timed out.
#   VRDMA_DEMO_TRANSPORT=frontend   use the reference vhost-user front-end instead of QEMU
#   VRDMA_TRANSPORT=vfio-user       serve the device over vfio-user to an UNMODIFIED QEMU (Debian's 11.1.3 in a
#                                   trixie chroot, installed and cached by scripts/vfio-user/stock-qemu.sh): no QEMU
#                                   is built. (VRDMA_DEMO_TRANSPORT=vfio-user does the same.)
#   VRDMA_CACHE                     where the built and installed peers are cached (default /var/cache/vrdma)
set -euo pipefail
cd "$(dirname "$0")/.."

# Boot (about a minute under TCG), transpiling and the exchanges fit in this on a 2-core machine.
DEMO_TIMEOUT_S=900

start=$(date +%s)
echo "[demo] setup (apt packages, npm ci, native addon)..." >&2
bash scripts/setup.sh >&2
echo "[demo] setup done, $(( $(date +%s) - start )) s in" >&2
if [ "${VRDMA_TRANSPORT:-}" = vfio-user ] || [ "${VRDMA_DEMO_TRANSPORT:-}" = vfio-user ]; then
  export VRDMA_DEMO_TRANSPORT=vfio-user
  # Installed here, outside the test host: inside it the root file system is read-only.
  echo "[demo] unmodified QEMU for vfio-user (installed in a chroot, cached; never built)..." >&2
  VRDMA_STOCK_QEMU=$(bash scripts/vfio-user/stock-qemu.sh | tail -n 1)
  [ -x "$VRDMA_STOCK_QEMU" ] || { echo "[demo] scripts/vfio-user/stock-qemu.sh gave no QEMU ($VRDMA_STOCK_QEMU)" >&2; exit 1; }
  export VRDMA_STOCK_QEMU
  echo "[demo] $("$VRDMA_STOCK_QEMU" --version | head -n 1) ready, $(( $(date +%s) - start )) s in" >&2
else
  echo "[demo] patched QEMU (cached after the first build)..." >&2
  VRDMA_QEMU=$(bash scripts/qemu/build.sh | tail -n 1)
  [ -x "$VRDMA_QEMU" ] || { echo "[demo] scripts/qemu/build.sh gave no QEMU binary ($VRDMA_QEMU)" >&2; exit 1; }
  export VRDMA_QEMU
fi
echo "[demo] soft-RoCE test host's kernel and initramfs (cached after the first build)..." >&2
bash scripts/rxe/build.sh >/dev/null
echo "[demo] booting the soft-RoCE test host and running the demo inside, $(( $(date +%s) - start )) s in..." >&2
# tsx as an import hook of node itself: one process inside the VM (npx tsx would start a second node).
status=0
bash scripts/rxe/run.sh --timeout "$DEMO_TIMEOUT_S" -- node --import tsx/esm scripts/demo.ts || status=$?
echo "[demo] wall time $(( $(date +%s) - start )) s, exit code $status" >&2
exit "$status"
