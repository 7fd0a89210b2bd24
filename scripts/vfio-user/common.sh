# Shared by scripts/vfio-user/*.sh (sourced, not run): the cache folders, a lock, log lines.
VFIO_CACHE=${VRDMA_CACHE:-/var/cache/vrdma}
VFIO_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VFIO_ROOT_DIR=$(cd "$VFIO_SCRIPTS_DIR/../.." && pwd)

vfio_log() { printf '[vfio-user] %s\n' "$*" >&2; }
vfio_die() { printf '[vfio-user] error: %s\n' "$*" >&2; exit 1; }

# An exclusive lock on one cache entry, so parallel callers never build or install it twice at once.
vfio_lock() {
  mkdir -p "$1"
  exec {VFIO_LOCK_FD}>"$1/.lock"
  flock "$VFIO_LOCK_FD"
}

# Runs "$@" with its output in the log file $2, and says what it does and how long it took (label $1). On failure
# the log's tail is shown.
vfio_step() {
  local label=$1 log=$2 start=$SECONDS
  shift 2
  vfio_log "$label ..."
  if ! "$@" >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    vfio_die "$label failed (whole log: $log)"
  fi
  vfio_log "$label: done in $((SECONDS - start)) s"
}
