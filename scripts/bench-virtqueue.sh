#!/usr/bin/env bash
# npm run bench:virtqueue: set up, then run bench/virtqueue/run.ts (which fetches QEMU's source for the native peer).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec npx tsx bench/virtqueue/run.ts
