#!/usr/bin/env bash
# Builds native/ with node-gyp (run by `npm install`/`npm ci` as the package's own install script).
# A missing tool or header stops here with one message naming the Debian package that provides it.
set -euo pipefail
cd "$(dirname "$0")/../native"
need() { # need <what> <debian package> <test command...>
  local what=$1 pkg=$2; shift 2
  if ! "$@" >/dev/null 2>&1; then
    echo "vrdma native addon: $what is missing; install it with: apt-get install $pkg (or run scripts/setup.sh as root)" >&2
    exit 1
  fi
}
need "a C++ compiler (g++)" g++ command -v g++
need "make" make command -v make
need "python3 (node-gyp runs it)" python3 command -v python3
need "Node.js headers (/usr/include/node/node_api.h)" nodejs test -f /usr/include/node/node_api.h
need "libibverbs headers (infiniband/verbs.h)" libibverbs-dev test -f /usr/include/infiniband/verbs.h
# npm 11 stops honouring the nodedir user config: pass it explicitly. Two builds at once in one checkout (parallel
# installs) would race on native/build: the second waits for the first.
exec flock build.lock npx --no-install node-gyp rebuild --nodedir=/usr --loglevel=warn
