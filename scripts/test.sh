#!/usr/bin/env bash
# The project's test command (`npm test`): set up whatever is missing, type-check, run every test, and end with the
# plain line `N passed, N failed` that CI reads.
#
# Suites:
#   host   every test on this machine (real sockets, memfds, QEMU in qtest mode)
#   rxe    tests that need real verbs, inside the soft-RoCE test host (a VM with rdma_rxe; scripts/rxe/run.sh)
#   multihost  issue 6's multi-host test: two test hosts joined only to each other (scripts/multihost/test.sh)
# Arguments, if any, are test files or folders to run instead of everything.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# How long the in-VM suite may take, boot included, before the runner stops the VM.
RXE_SUITE_TIMEOUT=3600
# tap's limit for one test file. Real peers are slow to start on a loaded 2-core machine: QEMU in qtest mode here,
# and above all the tests inside the test host, where every instruction is emulated (TCG) and files run one at a
# time so that the two "VMs" of a test are not starved by another file.
HOST_FILE_TIMEOUT=900
RXE_FILE_TIMEOUT=1500

if ! bash scripts/setup.sh; then
  echo "setup failed (see the lines above)"
  echo "0 passed, 1 failed"
  exit 1
fi

passed=0
failed=0
skipped=0

# The real peers the tests drive, built (or found in the cache) before any test starts, so that no test's own time
# limit has to cover a first build: the patched QEMU, the soft-RoCE test host's kernel and initramfs, libvfio-user and
# the unmodified QEMU of the vfio-user tests (installed in a trixie chroot, never built), the Linux guest's module and
# rdma-core provider (cmake of rdma-core's tree runs once, minutes), and the initramfs and tun.ko of the Linux guest
# that test/rxe/linux-guest.test.ts boots nested inside the test host (nothing is built in there).
echo "=== test peers"
if bash scripts/qemu/build.sh >/dev/null && bash scripts/rxe/build.sh >/dev/null \
  && bash scripts/vfio-user/libvfio-user.sh >/dev/null && bash scripts/vfio-user/stock-qemu.sh >/dev/null \
  && bash scripts/linux-guest/build.sh >/dev/null && bash scripts/linux-guest/provider.sh >/dev/null \
  && bash scripts/linux-guest/nested.sh >/dev/null; then
  passed=$((passed + 1))
  echo "ok - test peers built (QEMU, soft-RoCE test host, libvfio-user, the unmodified QEMU, the Linux guest's module, provider and nested initramfs)"
else
  failed=$((failed + 1))
  echo "not ok - test peers could not be built (see the lines above); the tests that need them will fail"
fi

# Adds the counts of tap's closing line `# { total: N, pass: N, fail: N, skip: N, todo: N }` from a log file.
# A suite that printed no such line crashed: it counts as one failure.
count_suite() {
  local name=$1 log=$2 summary
  summary=$(grep -E '^# \{ total:' "$log" | tail -n 1)
  if [ -z "$summary" ]; then
    echo "suite '$name' printed no tap summary: counted as failed"
    failed=$((failed + 1))
    return
  fi
  get() { printf '%s' "$summary" | grep -oE "$1: [0-9]+" | grep -oE '[0-9]+' || echo 0; }
  passed=$((passed + $(get pass)))
  failed=$((failed + $(get fail)))
  skipped=$((skipped + $(get skip) + $(get todo)))
}

run_host_suite() {
  local log
  log=$(mktemp)
  echo "=== host suite: ${*}"
  npx tap --timeout="$HOST_FILE_TIMEOUT" "$@" 2>&1 | tee "$log"
  count_suite host "$log"
  rm -f "$log"
}

run_multihost_suite() {
  local log
  log=$(mktemp)
  echo "=== multi-host suite (two soft-RoCE test hosts joined only to each other): test/multihost/multi-host.test.ts"
  bash scripts/multihost/test.sh 2>&1 | tee "$log"
  count_suite multihost "$log"
  rm -f "$log"
}

run_rxe_suite() {
  local log
  log=$(mktemp)
  echo "=== rxe suite (inside the soft-RoCE test host): ${*}"
  bash scripts/rxe/run.sh --timeout "$RXE_SUITE_TIMEOUT" -- npx tap --jobs=1 --timeout="$RXE_FILE_TIMEOUT" "$@" 2>&1 | tee "$log"
  count_suite rxe "$log"
  rm -f "$log"
}

echo "=== typecheck"
if npx tsc -p tsconfig.json --noEmit; then
  passed=$((passed + 1))
  echo "ok - typecheck"
else
  failed=$((failed + 1))
  echo "not ok - typecheck"
fi

echo "=== layers (.dependency-cruiser.cjs, file sizes)"
if bash scripts/check-layers.sh; then
  passed=$((passed + 1))
  echo "ok - layers"
else
  failed=$((failed + 1))
  echo "not ok - layers"
fi

# Coverage-guided fuzzing (test/fuzz/targets, scripts/fuzz/run.sh): every target briefly, on a full run only. Each
# target counts as one test: passed when libFuzzer ran it for its time without a finding.
FUZZ_SECONDS_PER_TARGET=20
if [ "$#" -eq 0 ]; then
  echo "=== fuzz (each target for ${FUZZ_SECONDS_PER_TARGET} s)"
  log=$(mktemp)
  bash scripts/fuzz/run.sh --seconds "$FUZZ_SECONDS_PER_TARGET" 2>&1 | tee "$log"
  summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1)
  if [ -z "$summary" ]; then
    echo "fuzz step printed no summary: counted as failed"
    failed=$((failed + 1))
  else
    passed=$((passed + $(echo "$summary" | cut -d' ' -f1)))
    failed=$((failed + $(echo "$summary" | cut -d' ' -f3)))
  fi
  rm -f "$log"
fi

# Test files are `*.test.ts` (other .ts files under test/ are helpers). Those under test/rxe/, and those named
# rxe-*.test.ts anywhere, need real verbs and run in the test host; test/multihost/multi-host.test.ts runs in its own
# step (two test hosts); every other one runs here.
host_targets=()
rxe_targets=()
multihost=0
if [ "$#" -gt 0 ]; then roots=("$@"); else roots=(test); fi
while IFS= read -r file; do
  if [[ $file == test/multihost/multi-host.test.ts ]]; then
    multihost=1
  elif [[ $file == test/rxe/* || $(basename "$file") == rxe-*.test.ts ]]; then
    rxe_targets+=("$file")
  else
    host_targets+=("$file")
  fi
done < <(find "${roots[@]}" -name '*.test.ts' -type f 2>/dev/null | sed 's|^\./||' | sort)

[ "${#host_targets[@]}" -gt 0 ] && run_host_suite "${host_targets[@]}"
[ "${#rxe_targets[@]}" -gt 0 ] && run_rxe_suite "${rxe_targets[@]}"
[ "$multihost" -eq 1 ] && run_multihost_suite

if [ "$skipped" -gt 0 ]; then
  echo "$passed passed, $failed failed, $skipped skipped"
else
  echo "$passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]
