#pragma once
#include <napi.h>

namespace vrdma {
// Builds the `sys` object: Unix sockets with fd passing, memfd, mmap as an external ArrayBuffer, eventfd, and
// readiness watchers on Node's own loop. Typed by vmm-device/native/sys.ts; nothing here knows any protocol.
Napi::Object InitSys(Napi::Env env);
}
