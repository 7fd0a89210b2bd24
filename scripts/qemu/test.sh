#!/usr/bin/env bash
# `npm run test:qemu`: the tests that drive the project's patched QEMU (test/qemu/). Builds QEMU first when its
# cached binary is missing (minutes, once), so no test hits tap's per-file timeout while QEMU compiles; then runs
# the tests through the project's test command, which ends with the line `N passed, N failed`.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
bash scripts/setup.sh || { echo "setup failed"; echo "0 passed, 1 failed"; exit 1; }
if ! VRDMA_QEMU=$(bash scripts/qemu/build.sh | tail -n 1) || [ ! -x "$VRDMA_QEMU" ]; then
  echo "the QEMU build failed (scripts/qemu/build.sh)"
  echo "0 passed, 1 failed"
  exit 1
fi
export VRDMA_QEMU
exec bash scripts/test.sh "${@:-test/qemu}"
