# Shared by scripts/rxe/build.sh and scripts/rxe/run.sh (sourced, not run).
# The soft-RoCE test host: Debian's own kernel (it has rdma_rxe as a module, which the machines here lack)
# booted under QEMU TCG, with the host's root shared read-only over 9p. Recipe: shared/research/rxe-vm.md.
# Progress goes to stderr; stdout is kept for what callers read (build.sh's one path, run.sh's command output).

# The kernel package: the one bookworm's linux-image-amd64 depends on. A new version means a new cache folder.
RXE_KERNEL_VERSION=6.1.0-56-amd64
RXE_KERNEL_PACKAGE=linux-image-$RXE_KERNEL_VERSION
RXE_CACHE=${VRDMA_CACHE:-/var/cache/vrdma}/rxe
RXE_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RXE_PROJECT_ROOT=$(cd "$RXE_SCRIPTS_DIR/../.." && pwd)

# Modules the initramfs loads (their dependencies are added from `modinfo -F depends`, in load order).
#   crc32_generic first in spirit: rxe computes its ICRC with the "crc32" crypto hash and, without a provider,
#   `rdma link add` fails with "No such file or directory".
#   virtio_pci + 9pnet_virtio + 9p: the host root; overlay: a writable view of it; veth: rxe0's netdev.
#   virtio_net: the link between two test hosts of a multi-host run (run.sh --host-link; unused otherwise).
RXE_ROOT_MODULES=(crc32_generic virtio_pci 9pnet_virtio 9p overlay veth virtio_net ib_uverbs rdma_rxe)

# Debian packages run.sh needs on the host (scripts/setup.sh lists and installs them all), as command:package.
RXE_HOST_COMMANDS=(
  qemu-system-x86_64:qemu-system-x86 busybox:busybox-static modinfo:kmod cpio:cpio ip:iproute2 rdma:iproute2
  ibv_devinfo:ibverbs-utils ibv_rc_pingpong:ibverbs-utils flock:util-linux setpriv:util-linux timeout:coreutils readelf:binutils xz:xz-utils
)
RXE_HOST_FILES=(
  /bin/busybox:busybox-static /usr/share/seabios/bios-256k.bin:seabios /usr/share/qemu/pvh.bin:qemu-system-data
  /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so:ibverbs-providers
)

rxe_log() { printf '[rxe] %s\n' "$*" >&2; }
rxe_die() { printf '[rxe] error: %s\n' "$*" >&2; exit 1; }

# Prints the Debian packages whose commands or files are missing (one a line).
rxe_missing_packages() {
  local entry
  for entry in "${RXE_HOST_COMMANDS[@]}"; do
    command -v "${entry%%:*}" >/dev/null 2>&1 || printf '%s\n' "${entry#*:}"
  done
  for entry in "${RXE_HOST_FILES[@]}"; do
    [ -e "${entry%%:*}" ] || printf '%s\n' "${entry#*:}"
  done
}

# Installs what is missing through the project's one set-up script (it knows every package the project needs).
rxe_ensure_packages() {
  local missing
  missing=$(rxe_missing_packages | sort -u | tr '\n' ' ')
  [ -z "$missing" ] && return 0
  rxe_log "missing Debian packages: $missing; running scripts/setup.sh"
  bash "$RXE_PROJECT_ROOT/scripts/setup.sh" >&2 || rxe_die "scripts/setup.sh failed (missing: $missing)"
  missing=$(rxe_missing_packages | sort -u | tr '\n' ' ')
  [ -z "$missing" ] || rxe_die "still missing after scripts/setup.sh: $missing (add them to its APT_PACKAGES)"
}

# Exclusive lock on the cache so parallel callers (tests run in parallel) never build twice at once.
rxe_lock() {
  mkdir -p "$RXE_CACHE"
  exec {RXE_LOCK_FD}>"$RXE_CACHE/.lock"
  flock "$RXE_LOCK_FD"
}
rxe_unlock() { exec {RXE_LOCK_FD}>&-; }

# rxe_take_slots COUNT: waits for COUNT test-host VM slots and holds them all (locks on fds this shell and its
# children keep: a slot is free again once every holder is gone). Waiters queue in arrival order (a ticket file
# each, locked by its owner: a dead owner's ticket is unlocked and removed); only the oldest live ticket may take
# slots, and it takes all COUNT at once or none (a multi-host run's two VMs need each other: holding one slot
# while waiting for the second could leave two such runs waiting for each other). Sets RXE_TICKET while waiting
# (the caller's clean-up removes it if killed meanwhile). Needs RXE_MAX_VMS and RXE_SLOT_POLL_S.
rxe_take_slots() {
  local count=$1 first other slot waiting_since= ticket_fd probe_fd slot_fd taken what="a free test-host slot" got="a slot"
  [ "$count" -eq 1 ] || { what="$count free test-host slots at once"; got="$count slots"; }
  [[ $RXE_MAX_VMS =~ ^[1-9][0-9]*$ ]] || rxe_die "VRDMA_RXE_MAX_VMS must be a positive number, not '$RXE_MAX_VMS'"
  [ "$count" -le "$RXE_MAX_VMS" ] || rxe_die "$count VM slots wanted, but only $RXE_MAX_VMS exist here (VRDMA_RXE_MAX_VMS)"
  mkdir -p "$RXE_CACHE/slots" "$RXE_CACHE/queue"
  RXE_TICKET=$RXE_CACHE/queue/$(date +%s%N)-$$
  exec {ticket_fd}>"$RXE_TICKET"
  flock -n "$ticket_fd" || rxe_die "cannot lock the queue ticket $RXE_TICKET"
  while :; do
    # A waiter that probed the ticket between its creation and its lock may have removed it: put it back.
    if [ ! -e "$RXE_TICKET" ]; then
      exec {ticket_fd}>&-
      exec {ticket_fd}>"$RXE_TICKET"
      flock -n "$ticket_fd" || rxe_die "cannot lock the queue ticket $RXE_TICKET"
    fi
    first=
    for other in $(ls "$RXE_CACHE/queue" 2>/dev/null | sort); do
      if [ "$RXE_CACHE/queue/$other" = "$RXE_TICKET" ]; then first=$RXE_TICKET; break; fi
      # Another waiter's ticket: live if its owner still holds the lock.
      if ( exec {probe_fd}>>"$RXE_CACHE/queue/$other" && flock -n "$probe_fd" ) 2>/dev/null; then
        rm -f "$RXE_CACHE/queue/$other"
        continue
      fi
      break
    done
    if [ "$first" = "$RXE_TICKET" ]; then
      taken=()
      for ((slot = 0; slot < RXE_MAX_VMS && ${#taken[@]} < count; slot++)); do
        exec {slot_fd}>"$RXE_CACHE/slots/$slot"
        if flock -n "$slot_fd"; then taken+=("$slot_fd"); else exec {slot_fd}>&-; fi
      done
      [ "${#taken[@]}" -eq "$count" ] && break
      # Not all of them: give back the ones taken (all or none).
      for slot_fd in "${taken[@]}"; do exec {slot_fd}>&-; done
    fi
    if [ -z "$waiting_since" ]; then
      waiting_since=$SECONDS
      rxe_log "waiting for $what ($RXE_MAX_VMS VM(s) at a time here; VRDMA_RXE_MAX_VMS changes it)"
    fi
    sleep "$RXE_SLOT_POLL_S"
  done
  rm -f "$RXE_TICKET"
  exec {ticket_fd}>&-
  RXE_TICKET=
  # "got a slot after N s": test/rxe-host/timeout.test.ts reads this line.
  [ -n "$waiting_since" ] && rxe_log "got $got after $((SECONDS - waiting_since)) s"
  return 0
}
