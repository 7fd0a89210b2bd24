// The functions of the addon's `verbs` object (init.cc builds it; vmm-device/verbs/native-verbs.ts types it).
#pragma once
#include <napi.h>

namespace vrdma::verbs {

// device.cc
Napi::Value ListDevices(const Napi::CallbackInfo& info);
Napi::Value OpenDevice(const Napi::CallbackInfo& info);
Napi::Value CloseDevice(const Napi::CallbackInfo& info);
Napi::Value QueryDevice(const Napi::CallbackInfo& info);
Napi::Value QueryPort(const Napi::CallbackInfo& info);
Napi::Value QueryGidTable(const Napi::CallbackInfo& info);
Napi::Value AllocPd(const Napi::CallbackInfo& info);
Napi::Value DeallocPd(const Napi::CallbackInfo& info);

// objects.cc
Napi::Value CreateCq(const Napi::CallbackInfo& info);
Napi::Value DestroyCq(const Napi::CallbackInfo& info);
Napi::Value CreateQp(const Napi::CallbackInfo& info);
Napi::Value ModifyQp(const Napi::CallbackInfo& info);
Napi::Value QueryQp(const Napi::CallbackInfo& info);
Napi::Value DestroyQp(const Napi::CallbackInfo& info);
Napi::Value RegMr(const Napi::CallbackInfo& info);
Napi::Value DeregMr(const Napi::CallbackInfo& info);
Napi::Value BufferAddress(const Napi::CallbackInfo& info);
Napi::Value CreateAh(const Napi::CallbackInfo& info);
Napi::Value DestroyAh(const Napi::CallbackInfo& info);

// completions.cc
Napi::Value ReqNotifyCq(const Napi::CallbackInfo& info);
Napi::Value PollCq(const Napi::CallbackInfo& info);

// wr.cc
Napi::Value PostSend(const Napi::CallbackInfo& info);
Napi::Value PostRecv(const Napi::CallbackInfo& info);
Napi::Value ParseSendWrsForTest(const Napi::CallbackInfo& info);
Napi::Value ParseRecvWrsForTest(const Napi::CallbackInfo& info);
Napi::Value WriteWcForTest(const Napi::CallbackInfo& info);

}  // namespace vrdma::verbs
