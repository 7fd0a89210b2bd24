// Module entry of the native addon: one object with a `sys` part (fds, sockets, mmap, eventfd, poll)
// and a `verbs` part (libibverbs). Neither part knows any virtio or vhost-user protocol.
#include <napi.h>

#include "sys.h"
#include "verbs.h"
#include "vfio-user/vfio_user.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("sys", vrdma::InitSys(env));
  exports.Set("verbs", vrdma::InitVerbs(env));
  // libvfio-user server contexts (the vfio-user transport); creating one may fail, loading does not.
  exports.Set("vfioUser", vrdma::InitVfioUser(env));
  return exports;
}

NODE_API_MODULE(vrdma_native, Init)
