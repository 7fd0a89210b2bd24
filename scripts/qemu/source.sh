#!/usr/bin/env bash
# Prints the path of the unpacked, patched QEMU source tree (Debian trixie's qemu), fetching it when missing.
# Used by builds that need QEMU's sources (e.g. subprojects/libvhost-user for the benchmark's native peer).
set -euo pipefail
. "$(dirname "$0")/common.sh"
qemu_lock
version=$(qemu_source_version)
qemu_source_tree "$version"
