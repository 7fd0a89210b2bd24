#!/usr/bin/env bash
# Builds the native part of the fuzzing engine, Jazzer.js 2.1.0's libFuzzer addon (@jazzer.js/fuzzer), on this
# machine, and leaves it where prebuild-install (the package's own install script) looks for a local prebuild:
#   $VRDMA_FUZZ_PREBUILDS/fuzzer-v2.1.0-napi-v4-linux-x64.tar.gz
# Why: the published prebuilds of Jazzer.js 4.x need glibc 2.38 (this is Debian 12, glibc 2.36), and 2.1.0's
# install script downloads its prebuild, or the LLVM sources to build one, from hosts this project cannot reach.
# Here the addon's sources come from the npm registry (the package's own tarball), libFuzzer from Debian
# (libclang-rt-14-dev), and the few symbols that only Code Intelligence's patched libFuzzer had come from
# scripts/fuzz/compat (see compat.cpp). Run by scripts/setup.sh before `npm ci`; cached by the hash of its inputs.
# Prints the prebuilds folder on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
JAZZER_VERSION=2.1.0
NODE_ADDON_API_VERSION=7.1.0   # the one @jazzer.js/fuzzer 2.1.0 depends on (^7.0.0)
LLVM_VERSION=14
LIBFUZZER=/usr/lib/llvm-$LLVM_VERSION/lib/clang/14.0.6/lib/linux/libclang_rt.fuzzer_no_main-x86_64.a
CACHE=${VRDMA_CACHE:-/var/cache/vrdma}/fuzz

log() { printf '[fuzz build] %s\n' "$*" >&2; }

if ! dpkg-query -W -f='${Status}\n' libclang-rt-$LLVM_VERSION-dev 2>/dev/null | grep -q '^install ok installed$'; then
  if [ "$(id -u)" -ne 0 ]; then
    log "libclang-rt-$LLVM_VERSION-dev (libFuzzer) is missing: run scripts/setup.sh as root or apt-get install it"
    exit 1
  fi
  log "installing libclang-rt-$LLVM_VERSION-dev (libFuzzer)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libclang-rt-$LLVM_VERSION-dev >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           libclang-rt-$LLVM_VERSION-dev >/dev/null; }
fi
[ -f "$LIBFUZZER" ] || { log "$LIBFUZZER not found"; exit 1; }

key=$(cat "$0" "$here"/compat/compat.cpp "$here"/compat/fuzzer/FuzzerDefs.h | sha256sum | cut -c1-16)
out=$CACHE/$key
tarball=$out/prebuilds/fuzzer-v$JAZZER_VERSION-napi-v4-linux-x64.tar.gz
if [ -f "$tarball" ]; then echo "$out/prebuilds"; exit 0; fi

mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
log "fetching the sources of @jazzer.js/fuzzer@$JAZZER_VERSION and node-addon-api@$NODE_ADDON_API_VERSION (npm registry)"
npm pack --silent "@jazzer.js/fuzzer@$JAZZER_VERSION" "node-addon-api@$NODE_ADDON_API_VERSION" >/dev/null
mkdir fuzzer napi
tar xzf jazzer.js-fuzzer-$JAZZER_VERSION.tgz -C fuzzer --strip-components=1
tar xzf node-addon-api-$NODE_ADDON_API_VERSION.tgz -C napi --strip-components=1

log "compiling the addon against Debian's libFuzzer $LLVM_VERSION"
mkdir -p build/Release
# NAPI_VERSION=4 as the package's CMakeLists sets it; the sources throw Napi::Error, hence C++ exceptions on.
g++ -std=c++17 -O2 -fPIC -shared -o build/Release/jazzerjs.node \
  -DNAPI_VERSION=4 -DNAPI_CPP_EXCEPTIONS -DBUILDING_NODE_EXTENSION \
  -I/usr/include/node -Inapi -I"$here/compat" \
  fuzzer/*.cpp fuzzer/shared/*.cpp "$here/compat/compat.cpp" \
  -Wl,--whole-archive "$LIBFUZZER" -Wl,--no-whole-archive -lpthread -ldl
# Every symbol must resolve against libc/libstdc++ and the Node binary's N-API: list what is left undefined
# other than napi_*/node_* (provided by node at load time); weak ones (optional hooks libFuzzer probes for) may stay.
undefined=$(nm -D --undefined-only build/Release/jazzerjs.node | awk '$1 == "U" {print $2}' \
  | grep -vE '^(napi_|node_|_ITM_|__gmon_start__|_Jv_|__cxa_|__gxx_|_Unwind_)' | grep -vE '@' || true)
if [ -n "$undefined" ]; then
  log "unresolved symbols in the addon: $undefined"
  exit 1
fi
mkdir -p "$out/prebuilds"
tar czf "$tarball.tmp" build/Release/jazzerjs.node
mv "$tarball.tmp" "$tarball"
log "built $tarball"
echo "$out/prebuilds"
