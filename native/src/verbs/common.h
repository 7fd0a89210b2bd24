// What every part of the addon's `verbs` object shares: the object registry's types (Entry, State), errors that
// name the verb, and the readers of JS arguments (each throws a precise EINVAL naming the verb and the field).
// The parts: registry.cc (handles), jobs.h (verbs on the thread pool), device.cc and objects.cc (the verbs
// themselves), events.cc (completion channel and async event watchers), completions.cc (outstanding work and the
// flush at destroy), wr.cc (the work-request and completion layouts shared with vmm-device/verbs/layout.ts),
// init.cc (the object JS sees); mapped.cc (CQs and QPs another process maps), doorbell.cc (the doorbell engine).
#pragma once
#include <infiniband/verbs.h>
#include <napi.h>
#include <uv.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "completions.h"

namespace vrdma::verbs {

enum class Kind { Context, Pd, Cq, Qp, Mr, Ah, Engine };

const char* KindName(Kind k);

struct State;

// One live object named by a handle. Parents count their children; `pending` counts jobs on the pool using it.
struct Entry {
  Kind kind;
  uint32_t id = 0;
  State* state = nullptr;
  void* obj = nullptr;
  std::vector<uint32_t> parents;
  uint32_t children = 0;
  uint32_t pending = 0;
  bool destroying = false;
  // qp
  ibv_qp_type qpType = IBV_QPT_RC;
  // cq, qp: created for another process to map (mapped.h): `obj` is this addon's own ibv_cq/ibv_qp, which the
  // provider never saw, so the provider's poll, post and destroy must never be called on it.
  bool mapped = false;
  // qp: the doorbell engine (its entry id, 0 for none) and slot this mapped QP is attached to (doorbell.cc)
  uint32_t engineId = 0;
  uint32_t engineSlot = 0;
  // mr: the JS memory, held so it cannot be collected while registered
  Napi::Reference<Napi::ArrayBuffer> memory;
  // context
  ibv_comp_channel* channel = nullptr;
  uv_poll_t* channelPoll = nullptr;
  uv_poll_t* asyncPoll = nullptr;
  Napi::FunctionReference onCqEvent;
  Napi::FunctionReference onAsyncEvent;
  std::unique_ptr<Napi::AsyncContext> asyncContext;
};

// One per Node environment (the `data` of every verbs function).
struct State {
  napi_env env = nullptr;
  std::shared_ptr<Completions> completions = std::make_shared<Completions>();
  uv_loop_t* loop = nullptr;
  uint32_t nextId = 1;
  std::unordered_map<uint32_t, std::unique_ptr<Entry>> entries;
  // Reused by post_send/post_recv so the data path allocates nothing once warm.
  std::vector<ibv_send_wr> sendWrs;
  std::vector<ibv_recv_wr> recvWrs;
  std::vector<ibv_sge> sges;
  std::vector<size_t> sgeStart;
};

inline State* StateOf(const Napi::CallbackInfo& info) { return static_cast<State*>(info.Data()); }

// ---------------------------------------------------------------------------------------------- errors (args.cc)

std::string ErrnoName(int err);
// `<verb>: <ERRNO> (<detail>)` with verb, errno, code and errnoNumber properties (native-verbs.ts reads them).
Napi::Error VerbError(Napi::Env env, const std::string& verb, int err, const std::string& detail);
Napi::Value Throw(Napi::Env env, const std::string& verb, int err, const std::string& detail = "");
// errno, or `fallback` when the library left it unset.
int ErrnoOr(int fallback);
// The result of a libibverbs constructor: 0, or errno (`fallback` when the library left errno unset).
inline int CreatedOr(const void* obj, int fallback) { return obj == nullptr ? ErrnoOr(fallback) : 0; }

// ---------------------------------------------------------------------------------------------- arguments (args.cc)

// Each reader returns false after throwing a precise EINVAL naming the verb and the field.
bool ReadU64(Napi::Env env, const char* verb, const char* field, Napi::Value v, uint64_t* out);
bool ReadUint(Napi::Env env, const char* verb, const char* field, Napi::Value v, uint64_t max, uint64_t* out);
bool ReadBool(Napi::Object obj, const char* field);
// A byte view argument (Uint8Array, or any TypedArray/DataView treated as bytes).
bool ReadBytes(Napi::Env env, const char* verb, const char* field, Napi::Value v, uint8_t** data, size_t* len);

template <typename T>
bool ReadField(Napi::Env env, const char* verb, Napi::Object obj, const char* field, T* out, bool* present,
               uint64_t max = static_cast<uint64_t>(static_cast<T>(~static_cast<T>(0)))) {
  Napi::Value v = obj.Get(field);
  if (v.IsUndefined()) {
    if (present) *present = false;
    return true;
  }
  uint64_t x = 0;
  if (!ReadUint(env, verb, field, v, max, &x)) return false;
  *out = static_cast<T>(x);
  if (present) *present = true;
  return true;
}

template <typename T>
bool ReadRequired(Napi::Env env, const char* verb, Napi::Object obj, const char* field, T* out,
                  uint64_t max = static_cast<uint64_t>(static_cast<T>(~static_cast<T>(0)))) {
  bool present = false;
  if (!ReadField(env, verb, obj, field, out, &present, max)) return false;
  if (!present) {
    Throw(env, verb, EINVAL, std::string(field) + " is required");
    return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------- conversions (args.cc)

Napi::Value GidToJs(Napi::Env env, const ibv_gid& gid);
// A big-endian GUID as libibverbs prints it (xxxx:xxxx:xxxx:xxxx).
std::string Hex64(uint64_t be);
bool ReadAhAttr(Napi::Env env, const char* verb, Napi::Value v, ibv_ah_attr* ah);
Napi::Object AhAttrToJs(Napi::Env env, const ibv_ah_attr& ah);
Napi::Object CapToJs(Napi::Env env, const ibv_qp_cap& cap);

}  // namespace vrdma::verbs
