#!/usr/bin/env bash
# `bash scripts/rxe/multi-host.sh [options] --host-2 '<command>' -- <host-1 command...>`: two soft-RoCE test hosts
# at once, joined only to each other. Each is the VM of run.sh (same kernel, read-only root, tmpfs overlay, no NIC to
# the outside) with one virtio NIC whose frames travel as datagrams between two unix sockets on this machine, and
# rxe0 on that NIC: host 1 is 10.77.0.1/24, host 2 is 10.77.0.2/24, so RDMA between them crosses the link with
# those two host addresses. Both commands start in the caller's working directory once their host's rxe0 is
# ACTIVE; inside, VRDMA_MULTIHOST_HOST is host-1 or host-2.
#
#   --timeout SECONDS   stop both VMs after this long (boot included) and exit 124 (default: $MH_DEFAULT_TIMEOUT)
#   --host-2 COMMAND    host 2's command, one string run by bash (required)
#   --grace SECONDS     how long host 2 may run on after host 1's command ended (default: $MH_DEFAULT_GRACE)
#   --env NAME, --out DIR, --verbose   as run.sh's, for both hosts
#
# Host 1's output goes to stdout, host 2's to stderr with "[host-2] " before each line. The exit code is host 1's
# command's; when that is 0 but host 2's is not, host 2's. 124 on time-out, 125 when a test host itself failed.
# The run takes two VM slots at once (or all there are, when fewer: VRDMA_RXE_MAX_VMS), never one while waiting
# for the other; each VM gets $MH_MEMORY of memory (VRDMA_RXE_MEMORY overrides it).
set -uo pipefail
. "$(dirname "$0")/common.sh"

MH_DEFAULT_TIMEOUT=1500
MH_DEFAULT_GRACE=60
MH_MAX_GRACE=3600
MH_MEMORY=3G
MH_HOST_1_ADDRESS=10.77.0.1/24
MH_HOST_2_ADDRESS=10.77.0.2/24
MH_VMS=2
RXE_MAX_VMS=${VRDMA_RXE_MAX_VMS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}
RXE_SLOT_POLL_S=1

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" \
    | sed -e "s/\$MH_DEFAULT_TIMEOUT/$MH_DEFAULT_TIMEOUT/" -e "s/\$MH_DEFAULT_GRACE/$MH_DEFAULT_GRACE/" -e "s/\$MH_MEMORY/$MH_MEMORY/" >&2
  exit 2
}
bad_usage() { printf '[multi-host] usage error: %s (see --help)\n' "$*" >&2; exit 2; }

timeout_seconds=$MH_DEFAULT_TIMEOUT
grace_seconds=$MH_DEFAULT_GRACE
host_2_command=
shared_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --timeout)
      [ $# -ge 2 ] && [[ $2 =~ ^[1-9][0-9]{0,5}$ ]] || bad_usage "--timeout takes a whole number of seconds"
      timeout_seconds=$2; shift 2 ;;
    --grace)
      [ $# -ge 2 ] && [[ $2 =~ ^[0-9]{1,5}$ ]] && [ "$2" -le "$MH_MAX_GRACE" ] \
        || bad_usage "--grace takes a whole number of seconds up to $MH_MAX_GRACE"
      grace_seconds=$2; shift 2 ;;
    --host-2)
      [ $# -ge 2 ] && [ -n "$2" ] || bad_usage "--host-2 needs a command"
      host_2_command=$2; shift 2 ;;
    --env | --out)
      [ $# -ge 2 ] || bad_usage "$1 needs a value"
      shared_args+=("$1" "$2"); shift 2 ;;
    --verbose) shared_args+=(--verbose); shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    -*) bad_usage "unknown option '$1'" ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || bad_usage "no host-1 command given: multi-host.sh [options] --host-2 '<command>' -- <command...>"
[ -n "$host_2_command" ] || bad_usage "--host-2 '<command>' is required"

# Build (or find) the kernel and initramfs once, before holding any slot.
rxe_ensure_packages
bash "$RXE_SCRIPTS_DIR/build.sh" >/dev/null || exit 125

link_dir=$(mktemp -d "/tmp/vrdma-multi-host.XXXXXX") || rxe_die "cannot create a folder in /tmp"
host_1_pid=
host_2_pid=
prefix_pid=
cleanup() {
  # SIGTERM to a run.sh stops its VM (its own trap); then the sockets' folder goes.
  for pid in $host_1_pid $host_2_pid; do kill "$pid" 2>/dev/null; done
  for pid in $host_1_pid $host_2_pid; do wait "$pid" 2>/dev/null; done
  [ -n "$prefix_pid" ] && kill "$prefix_pid" 2>/dev/null
  rm -rf "$link_dir"
  [ -n "${RXE_TICKET:-}" ] && rm -f "$RXE_TICKET"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

slots=$(( MH_VMS < RXE_MAX_VMS ? MH_VMS : RXE_MAX_VMS ))
rxe_take_slots "$slots"

export VRDMA_RXE_MEMORY=${VRDMA_RXE_MEMORY:-$MH_MEMORY}
started=$SECONDS
mkfifo "$link_dir/host-2.out"
sed -u 's/^/[host-2] /' <"$link_dir/host-2.out" >&2 &
prefix_pid=$!
VRDMA_MULTIHOST_HOST=host-2 bash "$RXE_SCRIPTS_DIR/run.sh" --slot-held --timeout "$timeout_seconds" "${shared_args[@]}" \
  --host-link "$MH_HOST_2_ADDRESS,$link_dir/host-2.sock,$link_dir/host-1.sock" -- bash -c "$host_2_command" \
  >"$link_dir/host-2.out" 2>&1 &
host_2_pid=$!
VRDMA_MULTIHOST_HOST=host-1 bash "$RXE_SCRIPTS_DIR/run.sh" --slot-held --timeout "$timeout_seconds" "${shared_args[@]}" \
  --host-link "$MH_HOST_1_ADDRESS,$link_dir/host-1.sock,$link_dir/host-2.sock" -- "$@" &
host_1_pid=$!

wait "$host_1_pid"
host_1_status=$?
host_1_pid=
# Host 2 normally ends by itself once host 1's command is done with it; after the grace period it is stopped.
waited=0
while kill -0 "$host_2_pid" 2>/dev/null && [ "$waited" -lt "$grace_seconds" ]; do
  sleep 1
  waited=$((waited + 1))
done
if kill -0 "$host_2_pid" 2>/dev/null; then
  rxe_log "host 2 still ran $grace_seconds s after host 1's command ended: stopping it"
  kill "$host_2_pid" 2>/dev/null
fi
wait "$host_2_pid"
host_2_status=$?
host_2_pid=
wait "$prefix_pid" 2>/dev/null
prefix_pid=
rxe_log "multi-host run: host 1 exit $host_1_status, host 2 exit $host_2_status, $((SECONDS - started)) s"
[ "$host_1_status" -ne 0 ] && exit "$host_1_status"
exit "$host_2_status"
