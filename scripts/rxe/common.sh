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
RXE_ROOT_MODULES=(crc32_generic virtio_pci 9pnet_virtio 9p overlay veth ib_uverbs rdma_rxe)

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
