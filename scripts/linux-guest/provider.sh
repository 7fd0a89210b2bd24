#!/usr/bin/env bash
# Usage: provider.sh
# Builds the libibverbs provider of the Linux guest driver (guest-driver-spec/linux-provider/, with the module's
# spec.h, virtio_rdma_abi.h and vrdma_wqe.h) inside rdma-core's tree, as a provider must be (libibverbs-dev
# installs no infiniband/driver.h). Prints the path of libvirtio_rdma-rdmav34.so as the LAST line of stdout;
# virtio_rdma.driver (the libibverbs config line naming it) sits next to it.
#
# rdma-core's source: Debian's rdma-core_56.1.orig.tar.gz (the version whose source still downloads from the
# archive; bookworm's 44.0 orig is gone), pinned by its SHA-256. A provider built there loads into bookworm's
# libibverbs 44.0: both have private ABI 34 and the same driver interface (libibverbs/driver.h differs only in
# calls this provider does not use), and the provider uses only calls 44.0 exports (the build test checks that).
#
# Caches under ${VRDMA_CACHE:-/var/cache/vrdma}/linux-guest/: rdma-core/ holds the tarball and one configured tree
# (cmake runs once, minutes on this machine); provider/<sha256 of the sources>/ holds a build, so the same
# sources build once. Warnings fail the build (rdma-core's ENABLE_WERROR).
# Build dependencies (checked, never installed here): cmake, ninja-build, gcc, pkg-config, python3,
# libnl-3-dev, libnl-route-3-dev.
set -euo pipefail
. "$(dirname "$0")/common.sh"

RDMA_CORE_VERSION=56.1
RDMA_CORE_SHA256=63ce7f2baa7242c2dbc76375dac957c420187dd27f8c5e148efc07971ee522a8
RDMA_CORE_URL=${VRDMA_DEBIAN_MIRROR:-http://deb.debian.org/debian}/pool/main/r/rdma-core/rdma-core_$RDMA_CORE_VERSION.orig.tar.gz
PROVIDER_SRC=$LG_PROJECT_ROOT/guest-driver-spec/linux-provider
SHARED_HEADERS=("$LG_MODULE_SRC/spec.h" "$LG_MODULE_SRC/virtio_rdma_abi.h" "$LG_MODULE_SRC/vrdma_wqe.h")
SO_NAME=libvirtio_rdma-rdmav34.so

hash=$( (cd "$PROVIDER_SRC" && find . -type f \( -name '*.c' -o -name '*.h' -o -name CMakeLists.txt \) -print0 \
  | sort -z | xargs -0 sha256sum; sha256sum "${SHARED_HEADERS[@]}" "$LG_SCRIPTS_DIR/provider.sh") | sha256sum | cut -c1-16)
out=$LG_CACHE/provider/$RDMA_CORE_VERSION/$hash
if [ -f "$out/$SO_NAME" ] && [ -f "$out/virtio_rdma.driver" ]; then
  printf '%s\n' "$out/$SO_NAME"
  exit 0
fi

missing=()
for tool in cmake ninja gcc pkg-config python3; do command -v "$tool" >/dev/null || missing+=("$tool"); done
for pc in libnl-3.0 libnl-route-3.0; do pkg-config --exists "$pc" || missing+=("$pc (dev package)"); done
[ ${#missing[@]} -eq 0 ] || lg_die "missing build dependencies: ${missing[*]} (apt-get install cmake ninja-build gcc pkg-config python3 libnl-3-dev libnl-route-3-dev)"

lg_lock
# Another caller may have built these sources while this one waited for the lock.
if [ -f "$out/$SO_NAME" ] && [ -f "$out/virtio_rdma.driver" ]; then
  printf '%s\n' "$out/$SO_NAME"
  exit 0
fi
t0=$(date +%s%N)
rc_cache=$LG_CACHE/rdma-core
tarball=$rc_cache/rdma-core_$RDMA_CORE_VERSION.orig.tar.gz
mkdir -p "$rc_cache"
if ! echo "$RDMA_CORE_SHA256  $tarball" | sha256sum -c --status 2>/dev/null; then
  lg_log "downloading $RDMA_CORE_URL"
  curl -fsS --retry 3 -m 300 -o "$tarball.new" "$RDMA_CORE_URL" || lg_die "download of rdma-core $RDMA_CORE_VERSION failed"
  echo "$RDMA_CORE_SHA256  $tarball.new" | sha256sum -c --status || lg_die "rdma-core tarball: SHA-256 mismatch"
  mv "$tarball.new" "$tarball"
fi

# One tree, configured once: rdma-core's own files never change; only providers/virtio_rdma is refreshed.
tree=$rc_cache/tree-$RDMA_CORE_VERSION
if [ ! -f "$tree/build/build.ninja" ]; then
  rm -rf "$tree" "$tree.new"
  mkdir -p "$tree.new"
  tar -xzf "$tarball" -C "$tree.new" --strip-components=1
  mkdir -p "$tree.new/providers/virtio_rdma"
  cp "$PROVIDER_SRC"/* "${SHARED_HEADERS[@]}" "$tree.new/providers/virtio_rdma/"
  grep -qx 'add_subdirectory(providers/siw)' "$tree.new/CMakeLists.txt" || lg_die "rdma-core's CMakeLists.txt has no providers/siw line to add ours after"
  sed -i 's|^add_subdirectory(providers/siw)$|&\nadd_subdirectory(providers/virtio_rdma)|' "$tree.new/CMakeLists.txt"
  mv "$tree.new" "$tree"
  lg_log "configuring rdma-core $RDMA_CORE_VERSION (cmake, once)"
  mkdir -p "$tree/build"
  (cd "$tree/build" && cmake -G Ninja -DNO_PYVERBS=1 -DNO_MAN_PAGES=1 -DENABLE_STATIC=0 -DENABLE_WERROR=1 \
    -DIN_PLACE=1 .. >&2) || { rm -rf "$tree/build"; lg_die "cmake of rdma-core failed (output above)"; }
else
  rm -rf "$tree/providers/virtio_rdma"
  mkdir -p "$tree/providers/virtio_rdma"
  cp "$PROVIDER_SRC"/* "${SHARED_HEADERS[@]}" "$tree/providers/virtio_rdma/"
fi
lg_log "building the virtio_rdma provider in rdma-core $RDMA_CORE_VERSION"
ninja -C "$tree/build" "lib/$SO_NAME" >&2 || lg_die "the provider build failed (output above)"
lg_log "built in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
mkdir -p "$out.new"
cp "$tree/build/lib/$SO_NAME" "$out.new/"
# libibverbs appends -rdmav34.so to a driver path given without it.
printf 'driver %s\n' "$out/libvirtio_rdma" >"$out.new/virtio_rdma.driver"
rm -rf "$out"; mv "$out.new" "$out"
printf '%s\n' "$out/$SO_NAME"
