#!/usr/bin/env bash
# Brings a fresh Debian 12 machine (root, apt reachable) to the state every npm script needs:
# system packages, node_modules (which builds the native addon). Idempotent and quick when nothing is missing,
# so every entry point (npm test, the demo, the benchmarks) calls it first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# Debian packages the project needs, one place for all of them.
#   build of the addon:           g++ make python3 pkgconf libibverbs-dev
#   host verbs at run time:       rdma-core ibverbs-providers ibverbs-utils perftest iproute2
#   soft-RoCE test host (VM):     qemu-system-x86 busybox-static kmod (the kernel .deb is fetched by scripts/rxe)
#   patched QEMU build:           dpkg-dev libglib2.0-dev libpixman-1-dev zlib1g-dev ninja-build + meson (backports)
#   VPC control-plane tests:      etcd-server (real etcd on loopback)
#   vfio-user:                    libjson-c-dev libcmocka-dev (libvfio-user's build), debootstrap (the chroot of
#                                 the unmodified QEMU: scripts/vfio-user/)
#   Linux guest's provider:       cmake libnl-3-dev libnl-route-3-dev (rdma-core's tree: scripts/linux-guest/provider.sh)
APT_PACKAGES=(
  g++ make python3 pkgconf libibverbs-dev
  rdma-core ibverbs-providers ibverbs-utils perftest iproute2
  qemu-system-x86 qemu-system-data seabios busybox-static kmod cpio
  dpkg-dev libglib2.0-dev libpixman-1-dev zlib1g-dev ninja-build
  etcd-server
  libjson-c-dev libcmocka-dev debootstrap
  cmake libnl-3-dev libnl-route-3-dev
)
# Packages that only bookworm-backports has in a new enough version (QEMU 10 needs meson >= 1.5).
BACKPORTS_PACKAGES=(meson)

log() { printf '[setup] %s\n' "$*" >&2; }

missing_packages() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || printf '%s\n' "$p"
  done
}

ensure_apt() {
  local missing
  mapfile -t missing < <(missing_packages "${APT_PACKAGES[@]}")
  local need_bpo=0
  if ! command -v meson >/dev/null || ! meson --version | awk -F. '{exit !($1>1 || ($1==1 && $2>=5))}'; then
    need_bpo=1
  fi
  if [ "${#missing[@]}" -eq 0 ] && [ "$need_bpo" -eq 0 ]; then return 0; fi
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian packages: ${missing[*]} ${BACKPORTS_PACKAGES[*]}; run as root or install them with apt-get"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if [ "$need_bpo" -eq 1 ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # bookworm-backports is built against bookworm's libc: safe to add (unlike trixie or later, never added here).
    echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/bookworm-backports.list
  fi
  log "installing Debian packages: ${missing[*]} $([ $need_bpo -eq 1 ] && echo "${BACKPORTS_PACKAGES[*]} (bookworm-backports)")"
  apt-get update -qq
  if [ "${#missing[@]}" -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if [ "$need_bpo" -eq 1 ]; then
    apt-get install -y -qq --no-install-recommends -t bookworm-backports "${BACKPORTS_PACKAGES[@]}" >/dev/null
  fi
}

ensure_npm() {
  # Reinstall when the lock file or the dependency lists changed since the last install. Other fields of
  # package.json (scripts, description) do not count: an `npm pkg set scripts.x=...` must not rebuild
  # node_modules under every process that is using it.
  local stamp=node_modules/.vrdma-install-stamp
  local want
  want=$( { cat package-lock.json 2>/dev/null
            node -e 'const p = require("./package.json");
                     console.log(JSON.stringify([p.dependencies, p.devDependencies, p.scripts && p.scripts.install]))'
          } | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  log "installing npm packages (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
  native_stamp_write
}

# The addon is built by npm ci; in a working tree whose native/ sources changed since, rebuild it here so that no
# test runs against a stale binary.
native_sources_hash() {
  # Every source file below native/src (it has sub-folders), in a stable order.
  find native/binding.gyp native/src -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1
}
native_stamp_write() {
  [ -d native/build ] && native_sources_hash > native/build/.vrdma-source-stamp
  return 0
}
ensure_native() {
  local stamp=native/build/.vrdma-source-stamp
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(native_sources_hash)" ]; then return 0; fi
  log "building the native addon (its sources changed)"
  bash scripts/build-native.sh
  native_stamp_write
}

# The fuzzing engine's native addon (Jazzer.js on Debian's libFuzzer; scripts/fuzz/build.sh says why), built or found
# in its cache before `npm ci`, whose install of @jazzer.js/fuzzer then takes it as a local prebuild.
ensure_fuzz_engine() {
  npm_config_jazzer_js_fuzzer_local_prebuilds=$(bash scripts/fuzz/build.sh)
  export npm_config_jazzer_js_fuzzer_local_prebuilds
}

ensure_apt
ensure_fuzz_engine
ensure_npm
ensure_native
# The Linux guest driver: Debian's kernel headers fetched and guest-driver-spec/linux/ built, both cached (a cached
# build answers in milliseconds). Not fatal here: test/linux-guest/module-build.test.ts reports a failed build.
bash scripts/linux-guest/build.sh >/dev/null || log "warning: the Linux guest module did not build (scripts/linux-guest/build.sh)"
