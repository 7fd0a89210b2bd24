#pragma once
#include <napi.h>

namespace vrdma {
// Builds the `vfioUser` object: one class, Context, a libvfio-user server context (a PCI function on a socket).
// It knows no virtio: register accesses, DMA maps, resets and interrupt masks go to JS callbacks, synchronously,
// from inside run() (called by JS when the poll fd is readable). Typed by vmm-device/native/vfio-user.ts.
Napi::Object InitVfioUser(Napi::Env env);
}
