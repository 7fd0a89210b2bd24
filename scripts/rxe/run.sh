#!/usr/bin/env bash
# `npm run rxe:run -- [options] -- <command...>`: runs a command inside the soft-RoCE test host, a QEMU TCG VM
# booting Debian's kernel with rdma_rxe, and returns the command's exit code. The VM sees the host's root
# (read-only, with a tmpfs overlay on top: writes inside never reach the host), runs the command in the caller's
# working directory with rxe0 ACTIVE on a veth pair that exists only inside it (no NIC: -nic none), and powers off.
#
#   --timeout SECONDS   stop the VM after this long (boot included) and exit 124 (default: $RXE_DEFAULT_TIMEOUT)
#   --env NAME          also pass the caller's variable NAME (always passed: PATH, HOME, CI, VRDMA_*)
#   --out DIR           share host folder DIR read-write at the same path inside (created if missing), so files
#                       written there (e.g. bench-results JSON) reach the host; may be repeated
#   --bench-results     the same as --out <project>/bench-results
#   --verbose           copy the boot console (kernel, init) to stderr as it comes
#   --host-link ADDRESS/PREFIX,LOCAL_SOCKET,REMOTE_SOCKET
#                       multi-host runs (scripts/rxe/multi-host.sh): rxe0 goes on a virtio NIC with that address
#                       instead of the veth pair; the NIC's frames travel as datagrams between the unix socket
#                       LOCAL_SOCKET (bound here) and REMOTE_SOCKET (the other test host's), nowhere else
#   --slot-held         the caller already holds the VM slot(s) (multi-host.sh): do not queue for one
# VRDMA_RXE_KERNEL_ARGS adds kernel parameters (e.g. "loglevel=7 initcall_debug" to see where boot time goes).
# VRDMA_RXE_CPU replaces the emulated CPU model (default: "max" without PKU and the AVX family, see RXE_CPU below).
#
# The command's output (stdout and stderr merged, as the VM has one console) goes to stdout, and nothing else
# does: boot messages are held back (shown on stderr only when the VM fails). Inside, VRDMA_IN_TEST_HOST=1.
# At most VRDMA_RXE_MAX_VMS test hosts run at once (default: one per 2 cores); others wait (not part of --timeout).
# Inside, tap's test processes transpile TypeScript with tsx rather than ts-node (see tsx-for-tap.mjs).
# Exit codes: the command's own; 124 on time-out; 125 when the test host itself failed (no exit code came back).
set -uo pipefail
. "$(dirname "$0")/common.sh"

RXE_DEFAULT_TIMEOUT=1800
RXE_MAX_TIMEOUT=86400
RXE_MAX_OUT_DIRS=8
RXE_EXIT_TIMEOUT=124
RXE_EXIT_HOST_FAILED=125
# QEMU as the research note measured it: TCG on every host (no KVM assumed), 2 vCPUs, 4 GiB. The tmpfs upper
# dir of the overlay may take 75% of that (node_modules caches, tap's .tap folder, test sockets).
RXE_MEMORY=${VRDMA_RXE_MEMORY:-4G}
RXE_UPPER_SIZE=75%
RXE_VCPUS=2
# The emulated CPU: QEMU's "max" without protection keys (PKU) and without the AVX family. Node processes in the
# test host died at random at start-up (issue 16): of SIGSEGV, or with a "Parse error" from tsx's WebAssembly lexer
# in a valid file. Both are what a spurious protection fault does: outside WebAssembly it kills the process; inside
# it, V8's trap handler takes it for an out-of-bounds access and the lexer sees a trap. V8 protects WebAssembly code
# with protection keys when the CPU offers PKU (--wasm-memory-protection-keys, on by default); "max" under TCG offers
# PKU, this machine's CPU does not (and no host-suite process ever crashed here). The AVX family went first (Debian
# 12's QEMU 7.2 was the first to translate AVX under TCG), but a start-up SIGSEGV came back without it, so PKU is
# the suspect now; both stay off. VRDMA_RXE_CPU overrides it.
RXE_CPU=${VRDMA_RXE_CPU:-max,pku=off,avx=off,avx2=off,fma=off,f16c=off,vaes=off,vpclmulqdq=off}
# Kernel parameters: a quiet console (the command's output shares it), power-off instead of a hang on panic,
# and no boot work a throw-away test VM does not need (crypto self-tests, LSMs, audit, CPU bug mitigations):
# under TCG each of these costs seconds.
RXE_KERNEL_ARGS="console=ttyS0 quiet loglevel=0 panic=-1 mitigations=off cryptomgr.notests lsm=capability audit=0"
# How many test-host VMs may run at once on this machine: each keeps 2 vCPUs busy, and on a 2-core machine two
# VMs side by side each run at half speed (boots of a minute, tests hitting their time limits). Other runs wait
# for a free slot; the wait does not count toward --timeout.
RXE_MAX_VMS=${VRDMA_RXE_MAX_VMS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}
RXE_SLOT_POLL_S=1
# Variables every run passes (plus every VRDMA_* one): what the project's scripts and tools read.
RXE_PASSED_VARIABLES=(PATH HOME CI)
# The NIC of --host-link: a MAC made of this prefix and the link address's last two bytes.
RXE_LINK_MAC_PREFIX=52:54:00:77

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" \
    | sed "s/\$RXE_DEFAULT_TIMEOUT/$RXE_DEFAULT_TIMEOUT/" >&2
  exit 2
}
bad_usage() { printf '[rxe] usage error: %s (see --help)\n' "$*" >&2; exit 2; }

timeout_seconds=$RXE_DEFAULT_TIMEOUT
extra_variables=()
out_dirs=()
verbose=0
host_link=
slot_held=0
while [ $# -gt 0 ]; do
  case $1 in
    --timeout)
      [ $# -ge 2 ] || bad_usage "--timeout needs a number of seconds"
      [[ $2 =~ ^[1-9][0-9]{0,5}$ ]] && [ "$2" -le "$RXE_MAX_TIMEOUT" ] \
        || bad_usage "--timeout must be a whole number of seconds from 1 to $RXE_MAX_TIMEOUT, not '$2'"
      timeout_seconds=$2; shift 2 ;;
    --env)
      [ $# -ge 2 ] || bad_usage "--env needs a variable name"
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || bad_usage "--env takes a variable name, not '$2'"
      extra_variables+=("$2"); shift 2 ;;
    --out)
      [ $# -ge 2 ] || bad_usage "--out needs a folder"
      out_dirs+=("$2"); shift 2 ;;
    --bench-results) out_dirs+=("$RXE_PROJECT_ROOT/bench-results"); shift ;;
    --verbose) verbose=1; shift ;;
    --host-link)
      [ $# -ge 2 ] || bad_usage "--host-link needs ADDRESS/PREFIX,LOCAL_SOCKET,REMOTE_SOCKET"
      [[ $2 =~ ^(([0-9]{1,3}\.){3}[0-9]{1,3})/([0-9]{1,2}),(/[^,]+),(/[^,]+)$ ]] \
        || bad_usage "--host-link takes ADDRESS/PREFIX,LOCAL_SOCKET,REMOTE_SOCKET (absolute socket paths), not '$2'"
      host_link=$2; shift 2 ;;
    --slot-held) slot_held=1; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    -*) bad_usage "unknown option '$1'" ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || bad_usage "no command given: run.sh [options] -- <command...>"
[ "${#out_dirs[@]}" -le "$RXE_MAX_OUT_DIRS" ] || bad_usage "at most $RXE_MAX_OUT_DIRS --out folders"

rxe_ensure_packages
assets=$(bash "$RXE_SCRIPTS_DIR/build.sh" | tail -n 1) || exit "$RXE_EXIT_HOST_FAILED"
[ -f "$assets/vmlinux" ] && [ -f "$assets/initrd.gz" ] || rxe_die "scripts/rxe/build.sh gave no kernel/initramfs"

# The run's folder: the VM reads the job script from it through the read-only share (same path inside).
run_dir=$(mktemp -d "/tmp/vrdma-rxe-run.XXXXXX") || rxe_die "cannot create a run folder in /tmp"
qemu_pid=
filter_pid=
cleanup() {
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null
  [ -n "$filter_pid" ] && kill "$filter_pid" 2>/dev/null
  rm -rf "$run_dir"
  [ -n "${RXE_TICKET:-}" ] && rm -f "$RXE_TICKET"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

token=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')

# The caller's environment that matters, as `export NAME=value` lines (values quoted for bash).
{
  for name in "${RXE_PASSED_VARIABLES[@]}" "${extra_variables[@]}" $(compgen -e | grep '^VRDMA_'); do
    [ -n "${!name+set}" ] && printf 'export %s=%q\n' "$name" "${!name}"
  done
} >"$run_dir/env.sh"

virtfs_out=()
out_paths=()
index=0
for dir in "${out_dirs[@]}"; do
  mkdir -p "$dir" || rxe_die "cannot create the --out folder $dir"
  abs=$(cd "$dir" && pwd -P) || rxe_die "cannot enter the --out folder $dir"
  [[ $abs != *$'\n'* ]] || rxe_die "the --out folder's path has a newline: $dir"
  virtfs_out+=(-virtfs "local,path=$abs,mount_tag=out$index,security_model=none")
  out_paths+=("$abs")
  index=$((index + 1))
done

{
  printf '# written by scripts/rxe/run.sh: one run of the soft-RoCE test host\n'
  printf 'RXE_TOKEN=%q\n' "$token"
  printf 'RXE_CWD=%q\n' "$PWD"
  printf 'RXE_ENV_FILE=%q\n' "$run_dir/env.sh"
  printf 'RXE_COMMAND=('; printf '%q ' "$@"; printf ')\n'
  [ -n "$host_link" ] && printf 'RXE_LINK_ADDRESS=%q\n' "${host_link%%,*}"
  printf '. %q\n' "$RXE_SCRIPTS_DIR/guest.sh"
  printf 'rxe_guest_main\n'
} >"$run_dir/job.sh"
# The initramfs mounts these (tag out<N> for line N) before it switches root.
[ ${#out_paths[@]} -eq 0 ] || printf '%s\n' "${out_paths[@]}" >"$run_dir/out-dirs"

# A VM slot: a lock held by this script and inherited by QEMU, so it is free again only once the VM is gone
# (rxe_take_slots in common.sh: waiters queue in arrival order). With --slot-held the caller holds it for us.
[ "$slot_held" -eq 1 ] || rxe_take_slots 1

# --host-link: the NIC joined only to the other test host (datagrams over two unix sockets on this machine).
link_args=()
if [ -n "$host_link" ]; then
  IFS=, read -r link_address link_local link_remote <<<"$host_link"
  IFS=./ read -r _ _ link_c link_d _ <<<"$link_address"
  link_mac=$(printf '%s:%02x:%02x' "$RXE_LINK_MAC_PREFIX" "$link_c" "$link_d")
  # romfile=: no option ROM (no network boot; Debian ships efi-virtio.rom only with ipxe-qemu).
  link_args=(-netdev "dgram,id=hostlink,local.type=unix,local.path=$link_local,remote.type=unix,remote.path=$link_remote"
    -device "virtio-net-pci,netdev=hostlink,mac=$link_mac,romfile=")
fi

# The console: QEMU's stdout (the serial port) goes through a FIFO to the filter, which keeps everything before
# the start marker in boot.log, copies the command's output to stdout, and takes the exit code from the exit marker.
mkfifo "$run_dir/console"
# setpriv --pdeathsig: if this script is killed outright (SIGKILL), `timeout` gets SIGTERM and passes it on to
# QEMU, so no VM outlives its runner. (`timeout` has its own process group: a terminal's Ctrl-C reaches it
# through the INT trap above.)
setpriv --pdeathsig TERM -- timeout --kill-after=5 "$timeout_seconds" qemu-system-x86_64 \
  -M q35 -accel tcg,thread=multi -cpu "$RXE_CPU" -smp "$RXE_VCPUS" -m "$RXE_MEMORY" \
  -nographic -nic none -no-reboot \
  -kernel "$assets/vmlinux" -initrd "$assets/initrd.gz" \
  -append "$RXE_KERNEL_ARGS vrdma.job=$run_dir/job.sh vrdma.upper=$RXE_UPPER_SIZE ${VRDMA_RXE_KERNEL_ARGS:-}" \
  -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap \
  "${virtfs_out[@]}" "${link_args[@]}" \
  </dev/null >"$run_dir/console" 2>"$run_dir/qemu.stderr" &
qemu_pid=$!

awk_flags=()
awk -W version 2>&1 | grep -q mawk && awk_flags=(-W interactive)
awk "${awk_flags[@]}" -v token="$token" -v boot_log="$run_dir/boot.log" -v code_file="$run_dir/exit-code" \
  -v verbose="$verbose" '
  BEGIN { start = "VRDMA-RXE-START " token; finish = "VRDMA-RXE-EXIT " token " "; state = "boot" }
  state == "boot" {
    print > boot_log
    if (verbose) { print > "/dev/stderr"; fflush("/dev/stderr") }
    if (index($0, start)) state = "command"
    next
  }
  state == "command" {
    i = index($0, finish)
    if (i == 0) { print; fflush(); next }
    # The command output may end without a newline: the marker then follows it on the same line.
    if (i > 1) { printf "%s", substr($0, 1, i - 1); fflush() }
    code = substr($0, i + length(finish)); sub(/[^0-9].*$/, "", code)
    print code > code_file; close(code_file)
    state = "after"
    next
  }
  { print > boot_log; if (verbose) { print > "/dev/stderr"; fflush("/dev/stderr") } }
' <"$run_dir/console" &
filter_pid=$!
# `wait` (unlike a foreground job) returns at once on a trapped signal: a SIGTERM from a test runner stops the VM now.
wait "$filter_pid"
filter_pid=

wait "$qemu_pid"
qemu_status=$?
qemu_pid=

show_failure() {
  printf '[rxe] %s\n' "$1" >&2
  if [ -s "$run_dir/boot.log" ]; then
    printf '[rxe] last lines of the boot console:\n' >&2
    tail -n 30 "$run_dir/boot.log" | tr -d '\r' | sed 's/^/[rxe]   /' >&2
  fi
  if [ -s "$run_dir/qemu.stderr" ]; then
    printf '[rxe] QEMU said:\n' >&2
    tail -n 20 "$run_dir/qemu.stderr" | sed 's/^/[rxe]   /' >&2
  fi
}

if [ "$qemu_status" -eq 124 ] || [ "$qemu_status" -eq 137 ]; then
  printf '\n[rxe] error: time-out: the test host ran longer than --timeout %s s; QEMU was stopped (exit %d)\n' \
    "$timeout_seconds" "$RXE_EXIT_TIMEOUT" >&2
  exit "$RXE_EXIT_TIMEOUT"
fi
if [ ! -s "$run_dir/exit-code" ]; then
  show_failure "error: the test host ended (QEMU exit status $qemu_status) without reporting the command's exit code"
  exit "$RXE_EXIT_HOST_FAILED"
fi
exit "$(cat "$run_dir/exit-code")"
