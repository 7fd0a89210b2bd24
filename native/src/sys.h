#pragma once
#include <napi.h>

namespace vrdma {
// Builds the `sys` object: fd passing, memfd, mmap as ArrayBuffer, eventfd, readiness watchers.
Napi::Object InitSys(Napi::Env env);
}
