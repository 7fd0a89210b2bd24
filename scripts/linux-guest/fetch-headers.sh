#!/usr/bin/env bash
# Fetches the Debian kernel headers the guest module is built against and unpacks them into
# ${VRDMA_CACHE:-/var/cache/vrdma}/linux-guest/headers/<release>/, then prints the headers folder (the `make -C`
# argument) as the LAST line of stdout. Cached: a second call only checks a stamp file.
#   packages: linux-headers-<abi>-<flavour>, linux-headers-<abi>-common, linux-kbuild-<series> and
#             linux-compiler-gcc-12-x86 (it only names the compiler: the host's gcc-12 is the one Debian built the
#             kernel with), downloaded with `apt-get download` from the host's bookworm sources.
#   pinning:  the ABI name of the test host's kernel (scripts/rxe/common.sh). When bookworm no longer carries it,
#             the suite's current ABI is used instead, with a warning: a module built that way does not load into
#             the pinned kernel, so the boot test would need the image re-pinned too.
# Debian's headers Makefile includes its -common twin by absolute path (/usr/src/...): the unpacked copy is
# pointed at its own -common folder so nothing is installed into the system.
set -euo pipefail
. "$(dirname "$0")/common.sh"

# Cached: answered before apt or the lock is touched (callers in the test host see /var/cache read-only).
pinned_headers=$LG_CACHE/headers/$LG_PINNED_RELEASE/usr/src/linux-headers-$LG_PINNED_RELEASE
if [ -f "$LG_CACHE/headers/$LG_PINNED_RELEASE/.complete" ] && [ -f "$pinned_headers/Makefile" ]; then
  printf '%s\n' "$pinned_headers"
  exit 0
fi

abi=$LG_PINNED_ABI
if ! lg_apt_has "linux-headers-$abi-$LG_FLAVOUR"; then
  current=$(lg_current_abi)
  [ -n "$current" ] || lg_die "neither linux-headers-$abi-$LG_FLAVOUR nor linux-headers-$LG_FLAVOUR is in the apt sources (apt-get update?)"
  lg_log "WARNING: linux-headers-$abi-$LG_FLAVOUR is gone from the archive; falling back to the suite's current ABI $current."
  lg_log "WARNING: the module will not load into the pinned test-host kernel $LG_PINNED_RELEASE; re-pin RXE_KERNEL_VERSION to $current-$LG_FLAVOUR."
  abi=$current
fi
release=$abi-$LG_FLAVOUR
dir=$LG_CACHE/headers/$release
headers=$dir/usr/src/linux-headers-$release

lg_lock
if [ -f "$dir/.complete" ] && [ -f "$headers/Makefile" ]; then
  printf '%s\n' "$headers"
  exit 0
fi

packages=("linux-headers-$release" "linux-headers-$abi-common" "linux-kbuild-$LG_KBUILD_SERIES" linux-compiler-gcc-12-x86)
lg_log "downloading ${packages[*]} (apt-get download)"
work=$(mktemp -d "${TMPDIR:-/tmp}/vrdma-linux-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT
t0=$(date +%s%N)
(
  cd "$work"
  # apt's sandbox user cannot write to a root-owned temporary folder; the warning it prints is harmless.
  apt-get download -q "${packages[@]}" 2> >(grep -v 'unsandboxed' >&2) >&2 \
    || lg_die "apt-get download ${packages[*]} failed (is deb.debian.org reachable?)"
)
rm -rf "$dir.new"
mkdir -p "$dir.new"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$dir.new"; done
mk=$dir.new/usr/src/linux-headers-$release/Makefile
grep -q "^include /usr/src/linux-headers-$abi-common/Makefile" "$mk" \
  || lg_die "unexpected $mk (Debian changed how the flavour's headers include the common ones)"
# The final path (not $dir.new): the folder is renamed into place below.
printf 'include %s\n' "$dir/usr/src/linux-headers-$abi-common/Makefile" >"$mk"
command -v gcc-12 >/dev/null || lg_die "gcc-12 is missing (Debian's kernel was built with it; scripts/setup.sh installs it)"
rm -rf "$dir"
mv "$dir.new" "$dir"
date -u +%FT%TZ >"$dir/.complete"
lg_log "headers of $release unpacked in $(( ($(date +%s%N) - t0) / 1000000 )) ms: $headers"
printf '%s\n' "$headers"
