# Shared by scripts/linux-guest/*.sh (sourced, not run).
# The guest kernel module guest-driver-spec/linux/ is built against the headers of the SAME Debian kernel the
# soft-RoCE test host boots (scripts/rxe/common.sh's RXE_KERNEL_VERSION): a module only loads into the kernel whose
# ABI name (vermagic) it was built for, and the boot test loads it into that kernel.
# Progress goes to stderr; stdout is kept for the one path the caller reads.

LG_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LG_PROJECT_ROOT=$(cd "$LG_SCRIPTS_DIR/../.." && pwd)
LG_CACHE=${VRDMA_CACHE:-/var/cache/vrdma}/linux-guest
LG_MODULE_SRC=$LG_PROJECT_ROOT/guest-driver-spec/linux

# The pinned kernel: taken from the test host's recipe so that image and headers never drift apart.
LG_PINNED_RELEASE=$(sed -n 's/^RXE_KERNEL_VERSION=//p' "$LG_PROJECT_ROOT/scripts/rxe/common.sh")
[ -n "$LG_PINNED_RELEASE" ] || { echo '[linux-guest] error: no RXE_KERNEL_VERSION in scripts/rxe/common.sh' >&2; exit 1; }
LG_FLAVOUR=${LG_PINNED_RELEASE##*-}     # amd64
LG_PINNED_ABI=${LG_PINNED_RELEASE%-*}    # 6.1.0-56
LG_KBUILD_SERIES=${LG_PINNED_ABI%.*}     # 6.1

lg_log() { printf '[linux-guest] %s\n' "$*" >&2; }
lg_die() { printf '[linux-guest] error: %s\n' "$*" >&2; exit 1; }

# Exclusive lock on the cache so parallel callers (tests run in parallel) never build twice at once.
lg_lock() {
  mkdir -p "$LG_CACHE"
  exec {LG_LOCK_FD}>"$LG_CACHE/.lock"
  flock "$LG_LOCK_FD"
}

# lg_apt_has PACKAGE: true when the host's apt sources (bookworm, bookworm-security) still carry it.
lg_apt_has() { apt-cache show --no-all-versions "$1" >/dev/null 2>&1; }

# The ABI name bookworm's linux-headers-<flavour> meta package points at now (the fallback when the pinned one is
# gone from the archive): its dependency linux-headers-<abi>-<flavour>.
lg_current_abi() {
  apt-cache depends "linux-headers-$LG_FLAVOUR" 2>/dev/null \
    | sed -n "s/^ *Depends: linux-headers-\([0-9][0-9.]*-[0-9][0-9]*\)-$LG_FLAVOUR\$/\1/p" | head -n 1
}

# lg_copy_libs ROOT FILE...: copies every shared library the FILEs load (ldd) to the same path under ROOT, so that
# an initramfs runs this machine's unmodified binaries.
lg_copy_libs() {
  local root=$1 lib
  shift
  for lib in $(ldd "$@" | grep -o '/[^ ]*' | grep -v ':$' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}
