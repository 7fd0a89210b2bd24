#!/usr/bin/env bash
# `npm run test:multihost`: issue 6's multi-host test. Two soft-RoCE test hosts joined only to each other
# (scripts/rxe/multi-host.sh); host 1 runs test/multihost/multi-host.test.ts under tap, host 2 the agent it drives
# (test/multihost/agent.ts). stdout is host 1's tap output, ending with tap's `# { total: N, pass: N, fail: N ... }`
# line; host 2's output and the runner's progress go to stderr. Exit code: multi-host.sh's (non-zero when either
# host failed).
#   --raw-tap   host 1 runs the test file with node itself and prints raw TAP (what `t.spawn` of the same file parses
#               when the file is run outside a multi-host run)
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

# The whole run, boot of both hosts included (the wait for free VM slots is not part of it).
MULTIHOST_TIMEOUT_S=1800
# tap's limit for the one file inside host 1 (the boot of host 2 and its node start happen meanwhile).
MULTIHOST_FILE_TIMEOUT_S=1500

raw=0
case ${1:-} in
  --raw-tap) raw=1 ;;
  '') ;;
  *) echo "usage: scripts/multihost/test.sh [--raw-tap]" >&2; exit 2 ;;
esac

# A fresh clone gets its set-up here; otherwise `npm test` (which CI runs first) has done it. Never re-synced from
# here: setup.sh re-installs node_modules when package.json changed, under the feet of whoever uses the checkout.
if [ ! -d node_modules/tap ]; then
  bash scripts/setup.sh >&2 || { echo "scripts/setup.sh failed" >&2; exit 1; }
fi

agent='exec node --import tsx/esm test/multihost/agent.ts'
if [ "$raw" -eq 1 ]; then
  host_1=(node --import tsx/esm test/multihost/multi-host.test.ts)
else
  host_1=(npx tap --jobs=1 --timeout="$MULTIHOST_FILE_TIMEOUT_S" test/multihost/multi-host.test.ts)
fi
exec bash scripts/rxe/multi-host.sh --timeout "$MULTIHOST_TIMEOUT_S" --host-2 "$agent" -- "${host_1[@]}"
