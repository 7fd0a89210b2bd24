#!/usr/bin/env bash
# `npm run qemu:build`: builds qemu-system-x86_64 from Debian trixie's qemu source with the project's source edits
# (scripts/qemu/README.md: a user-creatable vhost-user-device-pci, a name for virtio ID 42, reconnection, the
# inflight area and SET_STATUS for the generic vhost-user device, VIRTIO shared memory regions with SHMEM_MAP as
# QEMU 11.1 speaks them), and caches it by source version under
# ${VRDMA_CACHE:-/var/cache/vrdma}/qemu/<version>/. Prints the binary's path as the LAST line of stdout (callers
# run `bash scripts/qemu/build.sh | tail -n1`); progress goes to stderr. A cached binary makes this take seconds.
set -euo pipefail
. "$(dirname "$0")/common.sh"

# The minimal configuration: no docs, no default features, only what a vhost-user PCI device with a memfd
# memory backend under qtest needs. The +ds tarball strips firmware blobs and dtc, hence --disable-install-blobs
# and --disable-fdt; a pyenv python first on PATH could not see Debian's meson, hence the explicit --python.
CONFIGURE_ARGS=(
  --target-list=x86_64-softmmu --disable-docs --disable-werror --without-default-features
  --enable-vhost-user --enable-pixman --disable-fdt --disable-install-blobs --python=/usr/bin/python3
)
BUILD_JOBS=${VRDMA_QEMU_JOBS:-2}

# Progress on stderr: each set-up step says what it does when it starts and how long it took when it ends, so a
# caller waiting minutes sees where the time goes (the cache lock other callers hold, the fetch, make).
step_begin() { STEP_WHAT=$1; STEP_T0=$(date +%s%N); qemu_log "$1 ..."; }
step_end() { qemu_log "$STEP_WHAT: $(( ($(date +%s%N) - STEP_T0) / 1000000 )) ms"; }

need() { # need <what> <debian package> <test command...>
  local what=$1 pkg=$2; shift 2
  "$@" >/dev/null 2>&1 || qemu_die "$what is missing: apt-get install $pkg (scripts/setup.sh installs it)"
}
step_begin "checking the build tools"
need "meson >= 1.5" "-t bookworm-backports meson" \
  sh -c 'meson --version | awk -F. "{exit !(\$1>1 || (\$1==1 && \$2>=5))}"'
need "ninja" ninja-build command -v ninja
need "pkg-config" pkgconf command -v pkg-config
need "glib headers" libglib2.0-dev pkg-config --exists glib-2.0
need "pixman headers" libpixman-1-dev pkg-config --exists pixman-1
need "zlib headers" zlib1g-dev pkg-config --exists zlib
need "a C compiler" gcc command -v cc
need "make" make command -v make
step_end

step_begin "waiting for the QEMU cache lock ($QEMU_CACHE/.lock)"
qemu_lock
step_end
step_begin "looking up the $QEMU_SOURCE_SUITE qemu source version"
version=$(qemu_source_version)
step_end
dir=$(qemu_version_dir "$version")
# The binary is valid for these source edits and this configuration: a change to either builds another one,
# cached next to the others under its own recipe (a QEMU still running an older binary keeps it).
recipe=$( { qemu_edits_fingerprint; printf '%s\n' "${CONFIGURE_ARGS[@]}"; } | sha256sum | cut -d' ' -f1)
binary=$dir/bin/${recipe:0:16}/qemu-system-x86_64

# The first layout kept one binary in bin/ itself (bin/.recipe names its recipe).
legacy=$dir/bin/qemu-system-x86_64
if [ -x "$legacy" ] && [ "$(cat "$dir/bin/.recipe" 2>/dev/null)" = "$recipe" ]; then binary=$legacy; fi
if [ -x "$binary" ]; then
  qemu_log "cached: $binary (qemu $version)"
  printf '%s\n' "$binary"
  exit 0
fi

step_begin "fetching and patching the qemu $version source (cached after the first time)"
tree=$(qemu_source_tree "$version")
step_end

cd "$tree"
if [ ! -f build/build.ninja ] || [ "$(cat build/.vrdma-configure 2>/dev/null)" != "${CONFIGURE_ARGS[*]}" ]; then
  step_begin "configuring (minimal x86_64-softmmu)"
  rm -rf build
  ./configure "${CONFIGURE_ARGS[@]}" >&2 || qemu_die "configure failed"
  echo "${CONFIGURE_ARGS[*]}" > build/.vrdma-configure
  step_end
fi
step_begin "building qemu-system-x86_64 with make -j$BUILD_JOBS (about 3.5 minutes on 2 cores)"
make -j"$BUILD_JOBS" qemu-system-x86_64 >&2 || qemu_die "make qemu-system-x86_64 failed"
step_end

mkdir -p "$(dirname "$binary")"
cp -f build/qemu-system-x86_64 "$binary.tmp"
mv -f "$binary.tmp" "$binary"
"$binary" --version | head -n1 >&2
printf '%s\n' "$binary"
