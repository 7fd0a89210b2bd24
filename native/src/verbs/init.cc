// The `verbs` part of the addon: libibverbs for the TypeScript layer in vmm-device/verbs/ (native-verbs.ts types
// the object built here). The parts, by job (see common.h): the object registry (registry.h), verbs on the
// thread pool (jobs.h; device.cc, objects.cc), event watchers (events.h), outstanding work and the flush at
// destroy (completions.h), the work-request and completion layouts (wr.h).
#include "../verbs.h"

#include "mapped.h"
#include "registry.h"
#include "verbs_api.h"
#include "wr.h"

namespace vrdma {

Napi::Object InitVerbs(Napi::Env env) {
  using namespace verbs;
  State* st = new State;
  st->env = env;
  if (napi_get_uv_event_loop(env, &st->loop) != napi_ok) {
    Napi::Error::New(env, "vrdma verbs: cannot get the libuv loop").ThrowAsJavaScriptException();
    return Napi::Object::New(env);
  }
  napi_add_env_cleanup_hook(env, Cleanup, st);
  Napi::Object o = Napi::Object::New(env);
  auto fn = [&](const char* name, Napi::Value (*cb)(const Napi::CallbackInfo&)) {
    o.Set(name, Napi::Function::New(env, cb, name, st));
  };
  fn("listDevices", ListDevices);
  fn("openDevice", OpenDevice);
  fn("closeDevice", CloseDevice);
  fn("queryDevice", QueryDevice);
  fn("queryPort", QueryPort);
  fn("queryGidTable", QueryGidTable);
  fn("allocPd", AllocPd);
  fn("deallocPd", DeallocPd);
  fn("createCq", CreateCq);
  fn("destroyCq", DestroyCq);
  fn("reqNotifyCq", ReqNotifyCq);
  fn("pollCq", PollCq);
  fn("createQp", CreateQp);
  fn("modifyQp", ModifyQp);
  fn("queryQp", QueryQp);
  fn("destroyQp", DestroyQp);
  fn("regMr", RegMr);
  fn("deregMr", DeregMr);
  fn("bufferAddress", BufferAddress);
  fn("createAh", CreateAh);
  fn("destroyAh", DestroyAh);
  fn("postSend", PostSend);
  fn("postRecv", PostRecv);
  fn("createMappedCq", CreateMappedCq);
  fn("createMappedQp", CreateMappedQp);
  fn("createDoorbellEngine", CreateDoorbellEngine);
  fn("doorbellAttach", DoorbellAttach);
  fn("doorbellDetach", DoorbellDetach);
  fn("doorbellRing", DoorbellRing);
  fn("doorbellSetWakeFd", DoorbellSetWakeFd);
  fn("doorbellCounters", DoorbellCounters);
  fn("doorbellClose", CloseDoorbellEngine);
  fn("parseSendWrsForTest", ParseSendWrsForTest);
  fn("parseRecvWrsForTest", ParseRecvWrsForTest);
  fn("writeWcForTest", WriteWcForTest);
  Napi::Object limits = Napi::Object::New(env);
  limits.Set("SEND_WR_HEADER_BYTES", SEND_WR_HEADER_BYTES);
  limits.Set("RECV_WR_HEADER_BYTES", RECV_WR_HEADER_BYTES);
  limits.Set("SGE_BYTES", SGE_BYTES);
  limits.Set("WC_BYTES", WC_BYTES);
  limits.Set("MAX_WRS_PER_POST", MAX_WRS_PER_POST);
  limits.Set("MAX_SGE_PER_WR", MAX_SGE_PER_WR);
  limits.Set("MAX_WC_PER_POLL", MAX_WC_PER_POLL);
  limits.Set("MAX_INLINE_PER_WR", MAX_INLINE_PER_WR);
  o.Set("limits", limits);
  return o;
}

}  // namespace vrdma
