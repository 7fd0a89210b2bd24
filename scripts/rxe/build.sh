#!/usr/bin/env bash
# Builds the soft-RoCE test host's kernel and initramfs from Debian packages and caches them by kernel version
# under ${VRDMA_CACHE:-/var/cache/vrdma}/rxe/<kernel-version>/ (vmlinux, initrd.gz). Prints that folder as the
# LAST line of stdout; progress goes to stderr. A cached build makes this take milliseconds.
#   kernel:    `apt-get download linux-image-6.1.0-56-amd64` in a temporary folder, `dpkg-deb -x`, and the
#              ELF vmlinux taken out of its vmlinuz: under TCG, the xz decompressor of a bzImage takes 10 to 20 s,
#              while QEMU boots the ELF (it has a PVH entry note) at once.
#   initramfs: busybox-static's /bin/busybox, scripts/rxe/init.sh as /init, the modules of RXE_ROOT_MODULES
#              and their dependencies (from `modinfo -F depends` on the extracted tree) with their load order.
set -euo pipefail
. "$(dirname "$0")/common.sh"

# Progress on stderr: each set-up step says what it does when it starts and how long it took when it ends.
step_begin() { STEP_WHAT=$1; STEP_T0=$(date +%s%N); rxe_log "$1 ..."; }
step_end() { rxe_log "$STEP_WHAT: $(( ($(date +%s%N) - STEP_T0) / 1000000 )) ms"; }

step_begin "checking the Debian packages the build needs"
rxe_ensure_packages
step_end
step_begin "waiting for the test host's cache lock"
rxe_lock
step_end
dir=$RXE_CACHE/$RXE_KERNEL_VERSION
# The build is valid for this recipe: a change to the init script, the module list or this script rebuilds it.
recipe=$(cat "$RXE_SCRIPTS_DIR/init.sh" "$RXE_SCRIPTS_DIR/build.sh" "$RXE_SCRIPTS_DIR/common.sh" /bin/busybox | sha256sum | cut -d' ' -f1)
if [ -f "$dir/vmlinux" ] && [ -f "$dir/initrd.gz" ] && [ "$(cat "$dir/.recipe" 2>/dev/null)" = "$recipe" ]; then
  printf '%s\n' "$dir"
  exit 0
fi

rxe_log "building the test host's kernel and initramfs ($RXE_KERNEL_PACKAGE) into $dir"
work=$(mktemp -d "${TMPDIR:-/tmp}/vrdma-rxe-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
step_begin "downloading $RXE_KERNEL_PACKAGE (apt-get download)"
(
  cd "$work"
  # apt's sandbox user cannot write to a root-owned temporary folder; the warning it prints is harmless.
  apt-get download -q "$RXE_KERNEL_PACKAGE" >&2 2> >(grep -v 'unsandboxed' >&2) \
    || rxe_die "apt-get download $RXE_KERNEL_PACKAGE failed (is deb.debian.org reachable?)"
)
# The bzImage holds the kernel as one xz stream after its decompressor stub (Debian: CONFIG_KERNEL_XZ).
extract_vmlinux() { # extract_vmlinux <vmlinuz> <output>
  local offset
  offset=$(LC_ALL=C grep -obUaP '\xFD7zXZ\x00' "$1" | head -n 1 | cut -d: -f1)
  [ -n "$offset" ] || rxe_die "no xz stream in $1 (the kernel's compression changed? see CONFIG_KERNEL_* in its config)"
  # xz stops after the one stream, so tail may die of SIGPIPE: only xz's status counts.
  { tail -c +"$((offset + 1))" "$1" 2>/dev/null || :; } | xz -dc --single-stream >"$2" \
    || rxe_die "decompressing the kernel in $1 failed"
  [ "$(head -c 4 "$2" | od -An -c | tr -d ' ')" = '177ELF' ] || rxe_die "what $1 holds is not an ELF kernel"
  readelf -n "$2" 2>/dev/null | grep -q 'Xen' || rxe_die "the kernel in $1 has no PVH entry note (CONFIG_PVH)"
}

step_end
deb=$(ls "$work"/"$RXE_KERNEL_PACKAGE"_*.deb)
step_begin "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$work/kernel"
step_end
modules_dir=$work/kernel/lib/modules/$RXE_KERNEL_VERSION
[ -d "$modules_dir" ] || rxe_die "$deb has no lib/modules/$RXE_KERNEL_VERSION"

# Load order: every module after its dependencies (depth-first over `modinfo -F depends`).
step_begin "indexing the kernel's modules and resolving the load order of ${RXE_ROOT_MODULES[*]}"
declare -A module_path=() visited=()
while IFS= read -r -d '' ko; do
  name=$(basename "$ko"); name=${name%.ko*}
  module_path[${name//-/_}]=$ko
done < <(find "$modules_dir/kernel" -name '*.ko*' -print0)
order=()
add_module() {
  local name=${1//-/_} dep
  [ -n "${visited[$name]:-}" ] && return 0
  visited[$name]=1
  [ -n "${module_path[$name]:-}" ] || rxe_die "module $name is not in $deb"
  for dep in $(modinfo -F depends "${module_path[$name]}" | tr ',' ' '); do
    add_module "$dep"
  done
  order+=("$name")
}
for m in "${RXE_ROOT_MODULES[@]}"; do add_module "$m"; done
step_end

step_begin "writing the initramfs (busybox, /init, ${#order[@]} modules)"
root=$work/initramfs
mkdir -p "$root"/{bin,dev,proc,sys,modules}
cp /bin/busybox "$root/bin/busybox"
install -m 0755 "$RXE_SCRIPTS_DIR/init.sh" "$root/init"
for name in "${order[@]}"; do
  src=${module_path[$name]}
  case $src in
    *.ko) cp "$src" "$root/modules/$name.ko" ;;
    *.ko.xz) xz -dc "$src" >"$root/modules/$name.ko" ;;
    *.ko.zst) zstd -dqc "$src" >"$root/modules/$name.ko" ;;
    *) rxe_die "unknown module compression: $src" ;;
  esac
  printf '%s\n' "$name" >>"$root/modules/order"
done
rxe_log "modules, in load order: ${order[*]}"

mkdir -p "$dir"
(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$dir/initrd.gz.new"
step_end
step_begin "extracting the ELF vmlinux from vmlinuz-$RXE_KERNEL_VERSION"
extract_vmlinux "$work/kernel/boot/vmlinuz-$RXE_KERNEL_VERSION" "$dir/vmlinux.new"
step_end
mv "$dir/initrd.gz.new" "$dir/initrd.gz"
mv "$dir/vmlinux.new" "$dir/vmlinux"
printf '%s\n' "$recipe" >"$dir/.recipe"
rxe_log "built: $dir ($(du -sh "$dir/initrd.gz" | cut -f1) initramfs)"
printf '%s\n' "$dir"
