#!/usr/bin/env bash
# Prints the path of an UNMODIFIED QEMU >= 10.1 (the vfio-user client), installing it when the cache lacks it:
# Debian trixie-backports' qemu-system-x86 inside a trixie chroot (debootstrap). It is never built and never
# installed on this machine itself: its glibc is newer than bookworm's, and trixie lines in this machine's apt
# sources would replace bookworm's glibc. The printed path is a wrapper that runs the chroot's binary in a private
# mount namespace (the host's /dev, /proc, /sys, /tmp and /dev/shm bound in, so sockets and memfds are shared;
# the mounts vanish with the process), taking QEMU's own arguments.
#
# The version is pinned (QEMU_STOCK_VERSION); when Debian no longer has it, the suite's current trixie-backports
# version is installed instead and named in a log line. `<wrapper> --version` tells which one runs.
set -euo pipefail
. "$(dirname "$0")/common.sh"

QEMU_STOCK_SUITE=trixie
QEMU_STOCK_VERSION=1:11.1.3+ds-2~bpo13+1
QEMU_STOCK_MIRROR=http://deb.debian.org/debian
# What the chroot needs besides the binary: firmware comes with qemu-system-x86's own dependencies.
QEMU_STOCK_PACKAGES=(qemu-system-x86)

entry=$VFIO_CACHE/stock-qemu/$QEMU_STOCK_SUITE
chroot_dir=$entry/root
wrapper=$entry/qemu-system-x86_64

install_chroot() {
  local tmp=$entry/root.partial log=$entry/install.log
  : >"$log"
  rm -rf "$tmp"
  command -v debootstrap >/dev/null || vfio_die "debootstrap is missing (apt-get install debootstrap, or scripts/setup.sh)"
  vfio_step "debootstrap of a minimal $QEMU_STOCK_SUITE chroot" "$log" \
    debootstrap --variant=minbase "$QEMU_STOCK_SUITE" "$tmp" "$QEMU_STOCK_MIRROR"
  echo "deb $QEMU_STOCK_MIRROR $QEMU_STOCK_SUITE-backports main" >"$tmp/etc/apt/sources.list.d/backports.list"
  vfio_step "apt-get update inside the chroot" "$log" chroot "$tmp" apt-get -qq update
  local want=$QEMU_STOCK_VERSION
  if ! chroot "$tmp" apt-cache madison qemu-system-x86 | awk '{print $3}' | grep -qxF "$want"; then
    want=$(chroot "$tmp" apt-cache madison qemu-system-x86 | awk '/backports/ {print $3; exit}')
    [ -n "$want" ] || vfio_die "no qemu-system-x86 in $QEMU_STOCK_SUITE-backports"
    vfio_log "the pinned qemu-system-x86 $QEMU_STOCK_VERSION is gone from Debian: installing $want instead"
  fi
  vfio_step "installing qemu-system-x86 $want inside the chroot" "$log" \
    chroot "$tmp" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -t "$QEMU_STOCK_SUITE-backports" "qemu-system-x86=$want"
  chroot "$tmp" apt-get clean
  mv "$tmp" "$chroot_dir"
}

write_wrapper() {
  cat >"$wrapper.partial" <<WRAPPER
#!/bin/sh
# Runs the unmodified QEMU of $chroot_dir (written by scripts/vfio-user/stock-qemu.sh).
exec unshare --mount --propagation private /bin/sh -c '
  root=\$1; shift
  for d in /dev /dev/shm /proc /sys /tmp; do mount --rbind "\$d" "\$root\$d" || exit 125; done
  exec chroot "\$root" /usr/bin/qemu-system-x86_64 "\$@"
' vrdma-stock-qemu "$chroot_dir" "\$@"
WRAPPER
  chmod +x "$wrapper.partial"
  mv "$wrapper.partial" "$wrapper"
}

if [ ! -x "$chroot_dir/usr/bin/qemu-system-x86_64" ] || [ ! -x "$wrapper" ]; then
  vfio_lock "$entry"
  [ -x "$chroot_dir/usr/bin/qemu-system-x86_64" ] || install_chroot
  write_wrapper
fi
printf '%s\n' "$wrapper"
