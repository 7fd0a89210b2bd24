#!/usr/bin/env bash
# Usage: nested.sh
# Prepares, ON THIS MACHINE, what the nested Linux guest of test/rxe/linux-guest.test.ts needs, so that nothing is
# built inside the soft-RoCE test host (where every step is emulated): the guest's initramfs (virtio, the RDMA core
# and veth from the test host's kernel, virtio_rdma.ko, the rdma-core provider, this machine's unmodified
# ibv_devinfo, ibv_rc_pingpong, ibv_ud_pingpong and perftest's ib_write_lat, ib_send_lat and ib_write_bw, and
# guest-shell-init.sh as /init), and tun.ko of the pinned kernel (the test host loads it for the tap that links it
# to the guest: the patched QEMU has no user-mode networking, and the test host's initramfs carries no tun).
# Writes a manifest (JSON: qemu, kernel, initrd, tun, sources) and prints its path as the LAST line of stdout. The
# test finds it by the project's path ($LG_CACHE/nested/root-<sha256 of the path>.json) and checks its "sources"
# hash against the files it was built from (nested_sources below), so a stale build fails instead of running.
# scripts/test.sh runs this among the test peers.
set -euo pipefail
. "$(dirname "$0")/common.sh"

ko=$(bash "$LG_SCRIPTS_DIR/build.sh" | tail -n 1)
provider=$(bash "$LG_SCRIPTS_DIR/provider.sh" | tail -n 1)
[ -f "$provider" ] || lg_die "no libibverbs provider (scripts/linux-guest/provider.sh printed '$provider')"
rxe=$(bash "$LG_PROJECT_ROOT/scripts/rxe/build.sh" | tail -n 1)
qemu=$(bash "$LG_PROJECT_ROOT/scripts/qemu/build.sh" | tail -n 1)
[ -x "$qemu" ] || lg_die "no patched QEMU (scripts/qemu/build.sh printed '$qemu')"
[ -f "$rxe/vmlinux" ] && [ -f "$rxe/initrd.gz" ] || lg_die "no test-host kernel in '$rxe' (scripts/rxe/build.sh)"

# The guest's tools: unmodified, from this machine (Debian 12: libibverbs 44.0, perftest 4.5).
TOOLS=(/sbin/ip /usr/bin/ibv_devinfo /usr/bin/ibv_rc_pingpong /usr/bin/ibv_ud_pingpong
  /usr/bin/ib_write_lat /usr/bin/ib_send_lat /usr/bin/ib_write_bw)
for tool in "${TOOLS[@]}"; do [ -x "$tool" ] || lg_die "$tool missing (apt-get install iproute2 ibverbs-utils perftest)"; done
# The test host's modules the guest loads, in order (no 9p, overlay or rdma_rxe: the guest has no shared root and
# no soft-RoCE; virtio_net for its NIC, veth for the netdev of its VPC address).
GUEST_MODULES=(virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci veth failover net_failover
  virtio_net ib_core ib_uverbs)

# The sources the test checks the manifest against: the module's, the provider's and this folder's scripts. The
# same rule as nestedSourcesHash() in test/rxe/fixture/linux-guest.ts: for each file (sorted by path relative to
# the project), its path, a newline, its bytes; the SHA-256 of it all.
nested_sources() {
  (cd "$LG_PROJECT_ROOT" && find guest-driver-spec/linux guest-driver-spec/linux-provider scripts/linux-guest -type f \
    \( -name '*.c' -o -name '*.h' -o -name '*.sh' -o -name Kbuild -o -name Makefile -o -name CMakeLists.txt \) \
    | LC_ALL=C sort | while IFS= read -r f; do printf '%s\n' "$f"; cat "$f"; done) | sha256sum | cut -c1-64
}
sources=$(nested_sources)

# The initramfs's inputs: it is cached by them.
inputs=$( (cat "$ko" "$provider" "$rxe/initrd.gz" "$LG_SCRIPTS_DIR/guest-shell-init.sh" "$0"; sha256sum "${TOOLS[@]}") | sha256sum | cut -c1-16)

# tun.ko of the pinned kernel (the test host's), from its package, once.
tun=$LG_CACHE/kmod/$LG_PINNED_RELEASE/tun.ko
# One lock for both builds below (a second flock on a new descriptor of the same file would wait for the first).
[ -f "$tun" ] && [ -f "$LG_CACHE/nested/$inputs/initrd" ] || lg_lock
if [ ! -f "$tun" ]; then
  work=$(mktemp -d "${TMPDIR:-/tmp}/vrdma-linux-guest-kmod.XXXXXX")
  (cd "$work" && apt-get download "linux-image-$LG_PINNED_RELEASE" >&2) || lg_die "apt-get download linux-image-$LG_PINNED_RELEASE failed"
  dpkg-deb --fsys-tarfile "$work"/linux-image-*.deb | tar -x -C "$work" "./lib/modules/$LG_PINNED_RELEASE/kernel/drivers/net/tun.ko"
  mkdir -p "$(dirname "$tun")"
  mv "$work/lib/modules/$LG_PINNED_RELEASE/kernel/drivers/net/tun.ko" "$tun"
  rm -rf "$work"
fi

# The initramfs, uncompressed (the nested guest would spend seconds inflating it), cached by its inputs.
dir=$LG_CACHE/nested/$inputs
if [ ! -f "$dir/initrd" ]; then
  work=$(mktemp -d "${TMPDIR:-/tmp}/vrdma-linux-guest-nested.XXXXXX")
  mkdir -p "$work/all"
  (cd "$work/all" && zcat "$rxe/initrd.gz" | busybox cpio -i 2>/dev/null)
  mkdir -p "$work/root/bin" "$work/root/modules" "$work/root/usr/bin" "$work/root/sbin" "$work/root/usr/lib/virtio_rdma" \
    "$work/root/etc/libibverbs.d" "$work/root/proc" "$work/root/sys" "$work/root/dev"
  cp "$work/all/bin/busybox" "$work/root/bin/busybox"
  for module in "${GUEST_MODULES[@]}"; do
    cp "$work/all/modules/$module.ko" "$work/root/modules/" || lg_die "the test host's initramfs has no $module.ko"
    echo "$module"
  done >"$work/root/modules/order"
  # Without its debug sections (4.7 MB of the module's 4.8): every byte of the initramfs is copied by a nested CPU.
  objcopy --strip-debug "$ko" "$work/root/modules/virtio_rdma.ko"
  install -m 0755 "$LG_SCRIPTS_DIR/guest-shell-init.sh" "$work/root/init"
  for tool in "${TOOLS[@]}"; do cp "$tool" "$work/root$tool"; done
  cp "$provider" "$work/root/usr/lib/virtio_rdma/"
  echo 'driver /usr/lib/virtio_rdma/libvirtio_rdma' >"$work/root/etc/libibverbs.d/virtio_rdma.driver"
  # Not the provider's own libraries: its RUNPATH names rdma-core's build tree, and the tools' libibverbs (44.0)
  # is the one it runs with (libnl, its other need, comes with the tools).
  lg_copy_libs "$work/root" "${TOOLS[@]}"
  mkdir -p "$dir"
  (cd "$work/root" && find . | busybox cpio -o -H newc 2>/dev/null) >"$dir/initrd.new"
  mv "$dir/initrd.new" "$dir/initrd"
  rm -rf "$work"
fi

manifest=$LG_CACHE/nested/root-$(printf '%s' "$LG_PROJECT_ROOT" | sha256sum | cut -c1-16).json
printf '{"qemu":"%s","kernel":"%s","initrd":"%s","tun":"%s","sources":"%s","root":"%s"}\n' \
  "$qemu" "$rxe/vmlinux" "$dir/initrd" "$tun" "$sources" "$LG_PROJECT_ROOT" >"$manifest.new"
mv "$manifest.new" "$manifest"
lg_log "nested guest: initramfs $dir/initrd ($(du -k "$dir/initrd" | cut -f1) KiB), tun.ko $tun"
printf '%s\n' "$manifest"
