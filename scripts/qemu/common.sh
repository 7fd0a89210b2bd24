# Shared by scripts/qemu/build.sh and scripts/qemu/source.sh (sourced, not run).
# Fetches Debian trixie's qemu source package through an apt configuration that lives entirely in the cache
# folder (never /etc/apt: trixie lines there would make apt replace bookworm's glibc), unpacks it and applies
# the project's source edits (scripts/qemu/README.md). Progress goes to stderr; stdout is kept for the one path
# the caller prints.

QEMU_CACHE=${VRDMA_CACHE:-/var/cache/vrdma}/qemu
QEMU_APT_DIR=$QEMU_CACHE/apt
QEMU_SOURCE_SUITE=trixie
QEMU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
QEMU_PATCHES_DIR=$QEMU_SCRIPTS_DIR/patches

qemu_log() { printf '[qemu] %s\n' "$*" >&2; }
qemu_die() { printf '[qemu] error: %s\n' "$*" >&2; exit 1; }

qemu_apt() {
  apt-get \
    -o Dir::Etc::SourceList="$QEMU_APT_DIR/sources.list" \
    -o Dir::Etc::SourceParts=- \
    -o Dir::State::Lists="$QEMU_APT_DIR/lists" \
    -o Dir::Cache="$QEMU_APT_DIR/cache" \
    -o Dir::State::Status=/var/lib/dpkg/status \
    "$@"
}
qemu_apt_cache() {
  apt-cache \
    -o Dir::Etc::SourceList="$QEMU_APT_DIR/sources.list" \
    -o Dir::Etc::SourceParts=- \
    -o Dir::State::Lists="$QEMU_APT_DIR/lists" \
    -o Dir::Cache="$QEMU_APT_DIR/cache" \
    "$@"
}

# Takes an exclusive lock on the cache so parallel callers (tests run in parallel) never build twice at once.
qemu_lock() {
  mkdir -p "$QEMU_CACHE"
  exec {QEMU_LOCK_FD}>"$QEMU_CACHE/.lock"
  flock "$QEMU_LOCK_FD"
}

# Prints the version of trixie's qemu source package. Uses the cached package lists (no network) unless they are
# missing or VRDMA_QEMU_REFRESH=1 asks for a fresh look at the archive.
qemu_source_version() {
  mkdir -p "$QEMU_APT_DIR/lists/partial" "$QEMU_APT_DIR/cache/archives/partial"
  echo "deb-src http://deb.debian.org/debian $QEMU_SOURCE_SUITE main" > "$QEMU_APT_DIR/sources.list"
  if [ "${VRDMA_QEMU_REFRESH:-0}" = 1 ] || ! ls "$QEMU_APT_DIR"/lists/*_Sources* >/dev/null 2>&1; then
    qemu_log "fetching the $QEMU_SOURCE_SUITE source package lists (isolated apt configuration in $QEMU_APT_DIR)"
    qemu_apt -qq update >&2 || qemu_die "apt-get update of the isolated $QEMU_SOURCE_SUITE deb-src list failed"
  fi
  local version
  version=$(qemu_apt_cache showsrc qemu 2>/dev/null | awk '/^Package: qemu$/ {p=1} p && /^Version:/ {print $2; exit}')
  [ -n "$version" ] || qemu_die "no qemu source package in the $QEMU_SOURCE_SUITE lists ($QEMU_APT_DIR/lists)"
  printf '%s\n' "$version"
}

# The cache folder of a source version: the Debian epoch ("1:") is dropped, because make and meson mis-read
# colons in paths.
qemu_version_dir() { printf '%s/%s\n' "$QEMU_CACHE" "${1#*:}"; }

# Replaces exactly one occurrence of a fixed line in a file; fails loudly when the line is missing or repeated,
# so a new upstream version that moved the code cannot be built silently without the edit. Idempotent: a file
# that already carries the new text (a tree patched before) is left alone. The first edit of a file keeps the
# pristine file next to it as <file>.vrdma-orig, so a change of the edit list restores and re-applies in place
# instead of fetching the source again (make then rebuilds only what the edits touch).
qemu_edit_once() { # qemu_edit_once <file> <exact old line> <new line(s)>
  local file=$1 old=$2 new=$3 count
  if NEW="$new" perl -0ne 'exit(index($_, $ENV{NEW}) >= 0 ? 0 : 1)' "$file"; then
    return 0
  fi
  count=$(grep -cxF -- "$old" "$file" || true)
  [ "$count" = 1 ] || qemu_die "edit of $file: expected exactly 1 line '$old', found $count"
  [ -f "$file.vrdma-orig" ] || cp -p "$file" "$file.vrdma-orig"
  OLD="$old" NEW="$new" perl -0pi -e 's/^\Q$ENV{OLD}\E$/$ENV{NEW}/m' "$file"
  grep -qxF -- "$(printf '%s' "$new" | head -n1)" "$file" || qemu_die "edit of $file did not apply"
}

# Applies one patch of scripts/qemu/patches/ (paths a/... b/..., -p1) to the tree, for an edit too large for
# qemu_edit_once. Like qemu_edit_once it keeps <file>.vrdma-orig of each file it touches (unless an earlier edit
# already kept the pristine copy), so a changed edit list restores and re-applies in place; a patch already in the
# tree is left alone, and one that does not apply (a new upstream version moved the code) stops the build.
qemu_patch_once() { # qemu_patch_once <source tree> <patch file>
  local src=$1 patch=$2 file
  if (cd "$src" && patch -p1 -R --dry-run -s -f <"$patch" >/dev/null 2>&1); then
    return 0
  fi
  while IFS= read -r file; do
    [ -f "$src/$file" ] || qemu_die "patch $(basename "$patch"): $file is not in the tree"
    [ -f "$src/$file.vrdma-orig" ] || cp -p "$src/$file" "$src/$file.vrdma-orig"
  done < <(sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$patch")
  (cd "$src" && patch -p1 -s -f --no-backup-if-mismatch <"$patch" >&2) ||
    qemu_die "patch $(basename "$patch") does not apply to $src"
}

# The source edits (see /work/shared/research/qemu.md and scripts/qemu/README.md):
#  1. the generic vhost-user device is not user creatable in QEMU <= 10.1: make it (and its PCI proxy) creatable;
#  2. virtio_id_to_name() asserts for an ID missing from its name table: give virtio ID 42 a name;
#  3. hw/virtio/vhost-user-base.c (the generic device) as vhost-user-blk.c does it: wait for the chardev before
#     the first vhost_dev_init (a reconnecting chardev connects asynchronously), re-initialise the vhost state on
#     a reconnection (disconnect cleans it up), stop only a started device on disconnect, keep an inflight area
#     across reconnections (GET/SET_INFLIGHT_FD at start), and set vq_index_end so SET_STATUS DRIVER_OK and
#     SET_STATUS 0 reach the backend;
#  4. patches/vhost-user-shmem.patch: VIRTIO shared memory regions for the generic device, protocol-compatible
#     with QEMU 11.1 (protocol feature 22, GET_SHMEM_CONFIG 44, back-end requests SHMEM_MAP 9 / SHMEM_UNMAP 10;
#     a BAR with one shared-memory capability per region).
qemu_apply_edits() { # qemu_apply_edits <source tree>
  local src=$1
  qemu_edit_once "$src/hw/virtio/vhost-user-device.c" \
    '    dc->user_creatable = false;' '    dc->user_creatable = true;'
  qemu_edit_once "$src/hw/virtio/vhost-user-device-pci.c" \
    '    dc->user_creatable = false;' '    dc->user_creatable = true;'
  qemu_edit_once "$src/hw/virtio/virtio.c" \
    '    [VIRTIO_ID_GPIO] = "virtio-gpio"' \
    "$(printf '    [VIRTIO_ID_GPIO] = "virtio-gpio",\n    [42] = "virtio-rdma"')"
  local base=$src/hw/virtio/vhost-user-base.c
  qemu_edit_once "$src/include/hw/virtio/vhost-user-base.h" \
    '    bool connected;' \
    "$(printf '    bool connected;\n    struct vhost_inflight *inflight; /* vrdma: kept across reconnections */')"
  qemu_edit_once "$base" \
    '    vub->vhost_dev.acked_features = vdev->guest_features;' \
    "$(cat <<'C'
    vub->vhost_dev.acked_features = vdev->guest_features;
    vub->vhost_dev.vq_index_end = vub->vhost_dev.nvqs; /* vrdma: SET_STATUS */
    if (!vub->inflight) {
        vub->inflight = g_new0(struct vhost_inflight, 1);
    }
    ret = vhost_dev_prepare_inflight(&vub->vhost_dev, vdev);
    if (ret == 0 && !vub->inflight->addr) {
        ret = vhost_dev_get_inflight(&vub->vhost_dev, vub->vq_size,
                                     vub->inflight);
    }
    if (ret == 0) {
        ret = vhost_dev_set_inflight(&vub->vhost_dev, vub->inflight);
    }
    if (ret < 0) {
        error_report("Error setting up the inflight area: %d", -ret);
        goto err_guest_notifiers;
    }
C
)"
  qemu_edit_once "$base" \
    '    vub->connected = true;' \
    "$(cat <<'C'
    if (!vhost_dev->vqs) { /* vrdma: cleaned up by a disconnect */
        Error *local_err = NULL;
        struct vhost_virtqueue *vqs = g_new0(struct vhost_virtqueue,
                                             vub->num_vqs);
        vhost_dev->nvqs = vub->num_vqs;
        vhost_dev->vqs = vqs;
        if (vhost_dev_init(vhost_dev, &vub->vhost_user,
                           VHOST_BACKEND_TYPE_USER, 0, &local_err) < 0) {
            error_report_err(local_err);
            g_free(vqs);
            return -1;
        }
    }
    vub->connected = true;
C
)"
  qemu_edit_once "$base" \
    '    if (!vhost_user_init(&vub->vhost_user, &vub->chardev, errp)) {' \
    "$(cat <<'C'
    if (qemu_chr_fe_wait_connected(&vub->chardev, errp) < 0) { /* vrdma */
        return;
    }
    if (!vhost_user_init(&vub->vhost_user, &vub->chardev, errp)) {
C
)"
  qemu_edit_once "$base" \
    '    vub_stop(vdev);' \
    "$(printf '    if (vdev->vhost_started) { /* vrdma: never started, nothing to stop */\n        vub_stop(vdev);\n    }')"
  local patch
  for patch in "$QEMU_PATCHES_DIR"/*.patch; do
    qemu_patch_once "$src" "$patch"
  done
}

# A fingerprint of the source edits (the function bodies as bash normalizes them, so comments do not count, and
# the patches): a tree patched by other edits is restored from its .vrdma-orig copies and patched again.
qemu_edits_fingerprint() {
  { declare -f qemu_edit_once qemu_patch_once qemu_apply_edits; cat "$QEMU_PATCHES_DIR"/*.patch; } | sha256sum | cut -d' ' -f1
}

# Prints the path of the unpacked, patched source tree of <version>, fetching and patching it when missing.
qemu_source_tree() { # qemu_source_tree <version>
  local version=$1 dir
  dir=$(qemu_version_dir "$version")
  local tree=$dir/source
  if [ -f "$tree/.vrdma-patched" ] && [ "$(cat "$tree/.vrdma-patched")" = "$(qemu_edits_fingerprint)" ]; then
    printf '%s\n' "$tree"
    return 0
  fi
  if [ -f "$tree/configure" ] && [ -f "$tree/.vrdma-patched" ]; then
    qemu_log "the source edits changed: restoring the edited files and applying the edits again"
    local orig
    while IFS= read -r -d '' orig; do
      cp -p "$orig" "${orig%.vrdma-orig}" && touch "${orig%.vrdma-orig}"
    done < <(find "$tree" -name '*.vrdma-orig' -print0)
    qemu_apply_edits "$tree"
    qemu_edits_fingerprint > "$tree/.vrdma-patched"
    printf '%s\n' "$tree"
    return 0
  fi
  command -v dpkg-source >/dev/null || qemu_die "dpkg-source is missing: apt-get install dpkg-dev (scripts/setup.sh installs it)"
  rm -rf "$tree" "$dir/fetch"
  mkdir -p "$dir/fetch"
  qemu_log "fetching and unpacking the qemu $version source package into $dir"
  (cd "$dir/fetch" && qemu_apt -qq source "qemu=$version" >&2) || qemu_die "apt-get source qemu=$version failed"
  local unpacked
  unpacked=$(find "$dir/fetch" -mindepth 1 -maxdepth 1 -type d -name 'qemu-*' | head -n1)
  [ -n "$unpacked" ] && [ -f "$unpacked/configure" ] || qemu_die "no unpacked qemu tree in $dir/fetch"
  mv "$unpacked" "$tree"
  rm -rf "$dir/fetch"   # the .orig tarball and .dsc are not needed once unpacked (hundreds of MB)
  qemu_log "applying the project's source edits"
  qemu_apply_edits "$tree"
  qemu_edits_fingerprint > "$tree/.vrdma-patched"
  printf '%s\n' "$tree"
}
