#!/usr/bin/env bash
# Usage: build.sh [SOURCE_DIR] (default: guest-driver-spec/linux; boot.sh also builds test/linux-guest/selftest).
# Builds the guest kernel module guest-driver-spec/linux/ (virtio_rdma.ko) against Debian's kernel headers
# (scripts/linux-guest/fetch-headers.sh) and prints the path of the built .ko as the LAST line of stdout.
# Cached under ${VRDMA_CACHE:-/var/cache/vrdma}/linux-guest/module/<release>/<sha256 of the sources>/: the same
# sources build once. The sources are copied to a build folder first (kbuild writes its objects next to the
# sources; the checkout stays clean). Warnings fail the build (KCFLAGS=-Werror): "builds warnings-free" is part
# of the check.
set -euo pipefail
. "$(dirname "$0")/common.sh"

src=${1:-$LG_MODULE_SRC}
src=$(cd "$src" && pwd)
ko_name=$(sed -n 's/^obj-m += \(.*\)\.o$/\1/p' "$src/Kbuild" | head -n 1).ko
[ "$ko_name" != .ko ] || lg_die "no obj-m line in $src/Kbuild"
headers=$(bash "$LG_SCRIPTS_DIR/fetch-headers.sh" | tail -n 1)
release=$(basename "$headers"); release=${release#linux-headers-}
hash=$( (cd "$src" && find . -type f \( -name '*.c' -o -name '*.h' -o -name Kbuild -o -name Makefile \) \
  -print0 | sort -z | xargs -0 sha256sum; sha256sum "$LG_SCRIPTS_DIR/build.sh") | sha256sum | cut -c1-16)
out=$LG_CACHE/module/$release/$hash
if [ -f "$out/$ko_name" ]; then
  printf '%s\n' "$out/$ko_name"
  exit 0
fi
lg_lock
build=$(mktemp -d "${TMPDIR:-/tmp}/vrdma-linux-guest-build.XXXXXX")
trap 'rm -rf "$build"' EXIT
cp -r "$src"/. "$build"/
# The self-test includes nothing of the driver; the driver's own headers travel with its sources.
t0=$(date +%s%N)
lg_log "building $ko_name for $release"
make -s -C "$headers" M="$build" KCFLAGS=-Werror modules >&2 || lg_die "the module build failed (output above)"
lg_log "built in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
mkdir -p "$out.new"
cp "$build/$ko_name" "$out.new/"
rm -rf "$out"; mv "$out.new" "$out"
printf '%s\n' "$out/$ko_name"
