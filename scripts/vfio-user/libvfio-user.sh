#!/usr/bin/env bash
# Prints the install prefix of libvfio-user (include/, lib/, bin/ with the library's sample servers), building it
# when the cache lacks it. The source is the one Debian bundles in its qemu source package
# (subprojects/libvfio-user, fetched and unpacked by scripts/qemu/source.sh): libvfio-user is packaged nowhere else.
# Cached by the revision that package pins (subprojects/libvfio-user.wrap), so a new qemu source with the same
# libvfio-user does not rebuild it. Needs libjson-c-dev and libcmocka-dev (scripts/setup.sh installs them).
set -euo pipefail
. "$(dirname "$0")/common.sh"

qemu_source=$(bash "$VFIO_ROOT_DIR/scripts/qemu/source.sh" | tail -n 1)
src=$qemu_source/subprojects/libvfio-user
[ -f "$src/meson.build" ] || vfio_die "no libvfio-user in the qemu source ($src)"
revision=$(awk -F' *= *' '$1 == "revision" {print $2}' "$qemu_source/subprojects/libvfio-user.wrap")
[ -n "$revision" ] || vfio_die "no revision in $qemu_source/subprojects/libvfio-user.wrap"

entry=$VFIO_CACHE/libvfio-user/$revision
prefix=$entry/install
if [ ! -f "$entry/.built" ]; then
  vfio_lock "$entry"
fi
if [ ! -f "$entry/.built" ]; then
  rm -rf "$entry/build" "$prefix"
  log=$entry/build.log
  : >"$log"
  # release: no -Werror (the debug default), no debug logging on the hot path.
  vfio_step "configuring libvfio-user $revision" "$log" \
    meson setup --buildtype=release -Ddebug-logs=disabled --prefix="$prefix" --libdir=lib "$entry/build" "$src"
  vfio_step "building libvfio-user" "$log" ninja -C "$entry/build"
  vfio_step "installing libvfio-user into $prefix" "$log" meson install -C "$entry/build"
  mkdir -p "$prefix/bin"
  for sample in server client gpio-pci-idio-16 null lspci; do
    [ -x "$entry/build/samples/$sample" ] && cp "$entry/build/samples/$sample" "$prefix/bin/"
  done
  touch "$entry/.built"
fi
printf '%s\n' "$prefix"
