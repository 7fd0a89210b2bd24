# Sourced by a bench's run.sh that runs twice: out here, where it prepares and starts the soft-RoCE test host
# (bench-results/ shared with it read-write) and runs itself again inside it; and inside, where it runs the bench.
# Sourcing this moves to the repository's root (where the npm scripts and the test host start commands).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# Inside the test host (VRDMA_IN_TEST_HOST=1), runs the bench's TypeScript file $1 and does not return; out here,
# returns. tsx as an import hook of node itself: one process inside the VM (npx tsx would start a second node).
bench_exec_in_test_host() {
  if [ "${VRDMA_IN_TEST_HOST:-}" = 1 ]; then
    exec node --import tsx/esm "$1"
  fi
}

# Out here: runs the bench's run.sh ($2, from the root) inside a new test host stopped after $1 seconds (boot
# included); does not return.
bench_start_test_host() {
  exec bash scripts/rxe/run.sh --timeout "$1" --bench-results -- bash "$2"
}
