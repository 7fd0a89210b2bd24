// The `verbs` part of the addon: libibverbs for the TypeScript layer in vmm-device/verbs/.
//
// Objects (device contexts, PDs, CQs, QPs, MRs, AHs) live in a registry owned by this file and are named in JS by
// small integer handles that are never reused. A handle becomes invalid the moment its object starts being
// destroyed; any later use throws `<verb>: EBADF (...)` naming the handle. Parents count their children (a PD its
// QPs, MRs and AHs; a context its PDs and CQs; a CQ the QPs using it), so destroying a parent that still has
// children fails with EBUSY before libibverbs is called, and objects still alive when the Node environment tears
// down are released in dependency order (QP, AH, MR, then CQ, PD, context).
//
// Verbs that can sleep or pin memory (open, query, alloc/dealloc, create/modify/destroy, reg/dereg) run on the
// libuv thread pool and return Promises; while one runs, the objects it touches count a pending operation and
// cannot be destroyed. post_send, post_recv, poll_cq and req_notify_cq stay synchronous (they do not enter the
// kernel on rxe beyond a doorbell write).
//
// Each opened context has one completion channel shared by its CQs and two uv_poll watchers on Node's loop (the
// channel fd and the context's async-event fd, both made non-blocking). Events are acknowledged here as soon as
// they are read, so destroying a CQ or QP never waits for an acknowledgement from JS.
//
// Work requests and completions cross the boundary in fixed little-endian layouts, mirrored by
// vmm-device/verbs/layout.ts (keep the two in step; test/verbs/layout.test.ts checks them against each other):
//
//   send WR (SEND_WR_HEADER_BYTES = 64) followed by num_sge SGEs:
//     0 wr_id u64 | 8 opcode u32 | 12 send_flags u32 | 16 num_sge u32 | 20 imm_data u32 (host order; invalidate
//     rkey for SEND_WITH_INV) | 24 remote_addr u64 | 32 rkey u32 | 36 ah handle u32 (UD) | 40 compare_add u64 |
//     48 swap u64 | 56 remote_qpn u32 | 60 remote_qkey u32
//   recv WR (RECV_WR_HEADER_BYTES = 16) followed by num_sge SGEs:
//     0 wr_id u64 | 8 num_sge u32 | 12 reserved u32
//   SGE (SGE_BYTES = 16): 0 addr u64 | 8 length u32 | 12 lkey u32
//   work completion (WC_BYTES = 48):
//     0 wr_id u64 | 8 status u32 | 12 opcode u32 | 16 vendor_err u32 | 20 byte_len u32 | 24 imm_data u32 (host
//     order) | 28 qp_num u32 | 32 src_qp u32 | 36 wc_flags u32 | 40 pkey_index u16 | 42 slid u16 | 44 sl u8 |
//     45 dlid_path_bits u8 | 46 reserved u16

#include "verbs.h"

#include <arpa/inet.h>
#include <endian.h>
#include <fcntl.h>
#include <unistd.h>
#include <infiniband/verbs.h>
#include <uv.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <mutex>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace vrdma {
namespace {

constexpr uint32_t SEND_WR_HEADER_BYTES = 64;
constexpr uint32_t RECV_WR_HEADER_BYTES = 16;
constexpr uint32_t SGE_BYTES = 16;
constexpr uint32_t WC_BYTES = 48;
/** Work requests in one post_send/post_recv call. */
constexpr uint32_t MAX_WRS_PER_POST = 1024;
/** Scatter/gather entries in one work request (rxe allows 32; real devices fewer: the provider checks). */
constexpr uint32_t MAX_SGE_PER_WR = 32;
/** Completions in one poll_cq call. */
constexpr uint32_t MAX_WC_PER_POLL = 4096;
/** Completions read from libibverbs per ibv_poll_cq call (a stack array). */
constexpr int WC_BATCH = 64;
/** GID table entries read by queryGidTable. */
constexpr size_t MAX_GID_ENTRIES = 1024;

enum class Kind { Context, Pd, Cq, Qp, Mr, Ah };

const char* KindName(Kind k) {
  switch (k) {
    case Kind::Context: return "context";
    case Kind::Pd: return "pd";
    case Kind::Cq: return "cq";
    case Kind::Qp: return "qp";
    case Kind::Mr: return "mr";
    case Kind::Ah: return "ah";
  }
  return "?";
}

struct State;

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

// What each QP has outstanding, and completions taken off a CQ on JS's behalf: shared by the JS thread (post,
// poll) and the thread pool (a QP's destroy waits for its flush), so every access holds `mu`.
//
// A QP's send and receive queues as FIFOs of the work requests posted (wr_id, and for sends whether signaled).
// Completions come in order per queue: a successful send completion retires every WR up to and including the one
// it names (the unsignaled ones before it completed silently); an error completion (a failure or a flush, which
// rxe reports for every WR, signaled or not) retires the WR it names and the ones before it (those completed
// silently). Which queue a completion belongs to: its opcode when it succeeded (IBV_WC_RECV bit); for an error
// completion (whose opcode libibverbs leaves undefined: rxe gives a flushed receive opcode 0) the CQ it came from,
// and when both queues share that CQ the queue whose oldest WR has its wr_id.
// What a destroy can wait for exactly is every receive and every signaled send: unsignaled sends after the last
// signaled one may have completed silently, and nothing tells whether they did.
struct PostedSend {
  uint64_t wrId;
  bool signaled;
};
struct QpWork {
  std::deque<PostedSend> sends;
  std::deque<uint64_t> recvs;
  uint64_t signaledOutstanding = 0;
  bool signalAll = false;
  ibv_cq* sendCq = nullptr;
  ibv_cq* recvCq = nullptr;

  void PushSend(uint64_t wrId, bool signaled) {
    sends.push_back({wrId, signaled});
    if (signaled) signaledOutstanding++;
  }
  // Retires sends up to and including the first one named `wrId` (or, for a success not found by id, the
  // first signaled one).
  void RetireSends(uint64_t wrId, bool success) {
    bool found = false;
    for (const PostedSend& p : sends)
      if (p.wrId == wrId) {
        found = true;
        break;
      }
    if (!found && !success) return;  // not one of ours to attribute
    while (!sends.empty()) {
      PostedSend p = sends.front();
      sends.pop_front();
      if (p.signaled) signaledOutstanding--;
      if (found ? p.wrId == wrId : p.signaled) break;
    }
  }
  void RetireRecv(uint64_t wrId) {
    auto it = std::find(recvs.begin(), recvs.end(), wrId);
    if (it == recvs.end()) {
      if (!recvs.empty()) recvs.pop_front();
      return;
    }
    recvs.erase(recvs.begin(), it + 1);
  }
  bool Drained() const { return signaledOutstanding == 0 && recvs.empty(); }
};
struct Completions {
  std::mutex mu;
  std::unordered_map<uint32_t, QpWork> byQpNum;
  std::unordered_map<ibv_cq*, std::deque<ibv_wc>> taken;
};

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

// ---------------------------------------------------------------------------------------------- errors

std::string ErrnoName(int err) {
  const char* name = strerrorname_np(err);
  return name != nullptr ? name : "E" + std::to_string(err);
}

Napi::Error VerbError(Napi::Env env, const std::string& verb, int err, const std::string& detail) {
  std::string name = ErrnoName(err);
  std::string message = verb + ": " + name + " (" + (detail.empty() ? std::string(strerror(err)) : detail) + ")";
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("verb", Napi::String::New(env, verb));
  e.Set("errno", Napi::String::New(env, name));
  e.Set("code", Napi::String::New(env, name));
  e.Set("errnoNumber", Napi::Number::New(env, err));
  return e;
}

Napi::Value Throw(Napi::Env env, const std::string& verb, int err, const std::string& detail = "") {
  VerbError(env, verb, err, detail).ThrowAsJavaScriptException();
  return env.Undefined();
}

// ---------------------------------------------------------------------------------------------- argument reading

// Each reader returns false after throwing a precise EINVAL naming the verb and the field.
bool ReadU64(Napi::Env env, const char* verb, const char* field, Napi::Value v, uint64_t* out) {
  if (v.IsBigInt()) {
    bool lossless = false;
    uint64_t x = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) {
      Throw(env, verb, EINVAL, std::string(field) + " does not fit in 64 bits");
      return false;
    }
    *out = x;
    return true;
  }
  if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= 0 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<uint64_t>(d))) {
      Throw(env, verb, EINVAL, std::string(field) + " must be an integer in 0..2^53-1 (or a bigint)");
      return false;
    }
    *out = static_cast<uint64_t>(d);
    return true;
  }
  Throw(env, verb, EINVAL, std::string(field) + " must be a number or bigint");
  return false;
}

bool ReadUint(Napi::Env env, const char* verb, const char* field, Napi::Value v, uint64_t max, uint64_t* out) {
  if (!v.IsNumber()) {
    Throw(env, verb, EINVAL, std::string(field) + " must be a number");
    return false;
  }
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= static_cast<double>(max)) || d != static_cast<double>(static_cast<uint64_t>(d))) {
    Throw(env, verb, EINVAL, std::string(field) + " must be an integer in 0.." + std::to_string(max));
    return false;
  }
  *out = static_cast<uint64_t>(d);
  return true;
}

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

bool ReadBool(Napi::Object obj, const char* field) {
  Napi::Value v = obj.Get(field);
  return v.IsBoolean() && v.As<Napi::Boolean>().Value();
}

// A byte view argument (Uint8Array, or any TypedArray/DataView treated as bytes).
bool ReadBytes(Napi::Env env, const char* verb, const char* field, Napi::Value v, uint8_t** data, size_t* len) {
  if (v.IsTypedArray()) {
    Napi::TypedArray ta = v.As<Napi::TypedArray>();
    Napi::ArrayBuffer ab = ta.ArrayBuffer();
    *data = static_cast<uint8_t*>(ab.Data()) + ta.ByteOffset();
    *len = ta.ByteLength();
    return true;
  }
  if (v.IsDataView()) {
    Napi::DataView dv = v.As<Napi::DataView>();
    *data = static_cast<uint8_t*>(dv.ArrayBuffer().Data()) + dv.ByteOffset();
    *len = dv.ByteLength();
    return true;
  }
  Throw(env, verb, EINVAL, std::string(field) + " must be a Uint8Array");
  return false;
}

// ---------------------------------------------------------------------------------------------- registry

State* StateOf(const Napi::CallbackInfo& info) { return static_cast<State*>(info.Data()); }

Entry* Lookup(State* st, Napi::Env env, const char* verb, Napi::Value v, Kind kind, bool forDestroy = false) {
  if (!v.IsNumber()) {
    Throw(env, verb, EBADF, std::string(KindName(kind)) + " handle must be a number");
    return nullptr;
  }
  double d = v.As<Napi::Number>().DoubleValue();
  uint32_t id = (d >= 0 && d < 4294967296.0) ? static_cast<uint32_t>(d) : 0;
  auto it = st->entries.find(id);
  if (id == 0 || static_cast<double>(id) != d || it == st->entries.end()) {
    Throw(env, verb, EBADF,
          std::string(KindName(kind)) + " handle " + Napi::Number::New(env, d).ToString().Utf8Value() +
              " does not exist or was already destroyed");
    return nullptr;
  }
  Entry* e = it->second.get();
  if (e->kind != kind) {
    Throw(env, verb, EBADF,
          std::string(KindName(kind)) + " handle " + std::to_string(id) + " is a " + KindName(e->kind) + " handle");
    return nullptr;
  }
  if (e->destroying) {
    Throw(env, verb, EBADF, std::string(KindName(kind)) + " handle " + std::to_string(id) + " is being destroyed");
    return nullptr;
  }
  if (forDestroy) {
    if (e->children > 0) {
      Throw(env, verb, EBUSY,
            std::string(KindName(kind)) + " " + std::to_string(id) + " still has " + std::to_string(e->children) +
                " dependent object(s); destroy them first");
      return nullptr;
    }
    if (e->pending > 0) {
      Throw(env, verb, EBUSY,
            std::string(KindName(kind)) + " " + std::to_string(id) + " has " + std::to_string(e->pending) +
                " operation(s) in progress");
      return nullptr;
    }
  }
  return e;
}

// `reservedId`: an id taken from nextId earlier (CQs and QPs carry theirs in their libibverbs context pointer).
Entry* Register(State* st, Kind kind, void* obj, std::vector<uint32_t> parents, uint32_t reservedId = 0) {
  auto e = std::make_unique<Entry>();
  e->kind = kind;
  e->id = reservedId != 0 ? reservedId : st->nextId++;
  e->state = st;
  e->obj = obj;
  e->parents = std::move(parents);
  for (uint32_t p : e->parents) st->entries.at(p)->children++;
  Entry* raw = e.get();
  st->entries.emplace(raw->id, std::move(e));
  return raw;
}

void Unregister(State* st, Entry* e) {
  for (uint32_t p : e->parents) {
    auto it = st->entries.find(p);
    if (it != st->entries.end()) it->second->children--;
  }
  st->entries.erase(e->id);
}

// The opening of a verb on one live object named by info[0]: `env`, `st`, `verb` and the object's entry
// (`entryVar`); returns undefined (with a precise EBADF thrown) when info[0] is not a live object of `kind`.
#define VERB_ON(verbName, kind, entryVar)                      \
  Napi::Env env = info.Env();                                   \
  State* st = StateOf(info);                                    \
  (void)st;                                                     \
  const char* verb = verbName;                                  \
  Entry* entryVar = Lookup(st, env, verb, info[0], kind);       \
  if (entryVar == nullptr) return env.Undefined()

// ---------------------------------------------------------------------------------------------- async jobs

// A verb run on the thread pool. `run` executes there and returns 0 or an errno (and may set `detail`);
// `done` builds the resolved value on the JS thread; `finish` always runs on the JS thread first (it releases
// the pending-operation counts and undoes a failed destroy's marking).
class Job : public Napi::AsyncWorker {
 public:
  Job(Napi::Env env, std::string verb)
      : Napi::AsyncWorker(env, "vrdma.verbs"), deferred_(Napi::Promise::Deferred::New(env)), verb_(std::move(verb)) {}

  std::function<int(std::string& detail)> run;
  std::function<Napi::Value(Napi::Env)> done;
  std::function<void(bool ok)> finish;

  Napi::Promise Start() {
    Napi::Promise p = deferred_.Promise();
    Queue();
    return p;
  }

 protected:
  void Execute() override { err_ = run ? run(detail_) : 0; }

  void OnOK() override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    if (finish) finish(err_ == 0);
    if (err_ != 0) {
      deferred_.Reject(VerbError(env, verb_, err_, detail_).Value());
      return;
    }
    Napi::Value v = done ? done(env) : env.Undefined();
    if (env.IsExceptionPending()) {
      deferred_.Reject(env.GetAndClearPendingException().Value());
      return;
    }
    deferred_.Resolve(v);
  }

  void OnError(const Napi::Error& e) override {
    if (finish) finish(false);
    deferred_.Reject(e.Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::string verb_;
  int err_ = 0;
  std::string detail_;
};

// Marks `entries` as used by a job until it finishes.
void Hold(const std::vector<Entry*>& entries) {
  for (Entry* e : entries) e->pending++;
}
void Release(const std::vector<Entry*>& entries) {
  for (Entry* e : entries) e->pending--;
}

int ErrnoOr(int fallback) { return errno != 0 ? errno : fallback; }

// Queues a verb on the thread pool with `held` marked busy until it finishes (so none of them can be destroyed
// meanwhile); `done` (optional) builds the resolved value on the JS thread.
Napi::Value RunJob(Napi::Env env, const char* verb, std::vector<Entry*> held, std::function<int(std::string&)> run,
                   std::function<Napi::Value(Napi::Env)> done = nullptr) {
  Job* job = new Job(env, verb);
  Hold(held);
  job->run = std::move(run);
  job->finish = [held](bool) { Release(held); };
  job->done = std::move(done);
  return job->Start();
}

// The result of a libibverbs constructor: 0, or errno (`fallback` when the library left errno unset).
int CreatedOr(const void* obj, int fallback) { return obj == nullptr ? ErrnoOr(fallback) : 0; }

// ---------------------------------------------------------------------------------------------- conversions

Napi::Value GidToJs(Napi::Env env, const ibv_gid& gid) {
  Napi::Uint8Array a = Napi::Uint8Array::New(env, 16);
  memcpy(a.Data(), gid.raw, 16);
  return a;
}

std::string Hex64(uint64_t be) {
  // GUIDs are big-endian in libibverbs.
  uint64_t v = be64toh(be);
  char buf[24];
  snprintf(buf, sizeof buf, "%04x:%04x:%04x:%04x", static_cast<unsigned>((v >> 48) & 0xffff),
           static_cast<unsigned>((v >> 32) & 0xffff), static_cast<unsigned>((v >> 16) & 0xffff),
           static_cast<unsigned>(v & 0xffff));
  return buf;
}

bool ReadAhAttr(Napi::Env env, const char* verb, Napi::Value v, ibv_ah_attr* ah) {
  memset(ah, 0, sizeof *ah);
  if (!v.IsObject()) {
    Throw(env, verb, EINVAL, "ahAttr must be an object");
    return false;
  }
  Napi::Object o = v.As<Napi::Object>();
  if (!ReadField(env, verb, o, "dlid", &ah->dlid, nullptr) || !ReadField(env, verb, o, "sl", &ah->sl, nullptr, 15) ||
      !ReadField(env, verb, o, "srcPathBits", &ah->src_path_bits, nullptr, 127) ||
      !ReadField(env, verb, o, "staticRate", &ah->static_rate, nullptr) ||
      !ReadRequired(env, verb, o, "portNum", &ah->port_num))
    return false;
  Napi::Value grh = o.Get("grh");
  if (grh.IsUndefined() || grh.IsNull()) return true;
  if (!grh.IsObject()) {
    Throw(env, verb, EINVAL, "ahAttr.grh must be an object");
    return false;
  }
  Napi::Object g = grh.As<Napi::Object>();
  ah->is_global = 1;
  uint8_t* gid = nullptr;
  size_t gidLen = 0;
  if (!ReadBytes(env, verb, "ahAttr.grh.dgid", g.Get("dgid"), &gid, &gidLen)) return false;
  if (gidLen != 16) {
    Throw(env, verb, EINVAL, "ahAttr.grh.dgid must be 16 bytes, got " + std::to_string(gidLen));
    return false;
  }
  memcpy(ah->grh.dgid.raw, gid, 16);
  if (!ReadField(env, verb, g, "flowLabel", &ah->grh.flow_label, nullptr, 0xfffff) ||
      !ReadRequired(env, verb, g, "sgidIndex", &ah->grh.sgid_index) ||
      !ReadField(env, verb, g, "hopLimit", &ah->grh.hop_limit, nullptr) ||
      !ReadField(env, verb, g, "trafficClass", &ah->grh.traffic_class, nullptr))
    return false;
  return true;
}

Napi::Object AhAttrToJs(Napi::Env env, const ibv_ah_attr& ah) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("dlid", ah.dlid);
  o.Set("sl", ah.sl);
  o.Set("srcPathBits", ah.src_path_bits);
  o.Set("staticRate", ah.static_rate);
  o.Set("portNum", ah.port_num);
  if (ah.is_global) {
    Napi::Object g = Napi::Object::New(env);
    g.Set("dgid", GidToJs(env, ah.grh.dgid));
    g.Set("flowLabel", ah.grh.flow_label);
    g.Set("sgidIndex", ah.grh.sgid_index);
    g.Set("hopLimit", ah.grh.hop_limit);
    g.Set("trafficClass", ah.grh.traffic_class);
    o.Set("grh", g);
  }
  return o;
}

Napi::Object CapToJs(Napi::Env env, const ibv_qp_cap& cap) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("maxSendWr", cap.max_send_wr);
  o.Set("maxRecvWr", cap.max_recv_wr);
  o.Set("maxSendSge", cap.max_send_sge);
  o.Set("maxRecvSge", cap.max_recv_sge);
  o.Set("maxInlineData", cap.max_inline_data);
  return o;
}

const char* AsyncEventName(ibv_event_type t) {
  switch (t) {
    case IBV_EVENT_CQ_ERR: return "CQ_ERR";
    case IBV_EVENT_QP_FATAL: return "QP_FATAL";
    case IBV_EVENT_QP_REQ_ERR: return "QP_REQ_ERR";
    case IBV_EVENT_QP_ACCESS_ERR: return "QP_ACCESS_ERR";
    case IBV_EVENT_COMM_EST: return "COMM_EST";
    case IBV_EVENT_SQ_DRAINED: return "SQ_DRAINED";
    case IBV_EVENT_PATH_MIG: return "PATH_MIG";
    case IBV_EVENT_PATH_MIG_ERR: return "PATH_MIG_ERR";
    case IBV_EVENT_DEVICE_FATAL: return "DEVICE_FATAL";
    case IBV_EVENT_PORT_ACTIVE: return "PORT_ACTIVE";
    case IBV_EVENT_PORT_ERR: return "PORT_ERR";
    case IBV_EVENT_LID_CHANGE: return "LID_CHANGE";
    case IBV_EVENT_PKEY_CHANGE: return "PKEY_CHANGE";
    case IBV_EVENT_SM_CHANGE: return "SM_CHANGE";
    case IBV_EVENT_SRQ_ERR: return "SRQ_ERR";
    case IBV_EVENT_SRQ_LIMIT_REACHED: return "SRQ_LIMIT_REACHED";
    case IBV_EVENT_QP_LAST_WQE_REACHED: return "QP_LAST_WQE_REACHED";
    case IBV_EVENT_CLIENT_REREGISTER: return "CLIENT_REREGISTER";
    case IBV_EVENT_GID_CHANGE: return "GID_CHANGE";
    case IBV_EVENT_WQ_FATAL: return "WQ_FATAL";
  }
  return "UNKNOWN";
}

// ---------------------------------------------------------------------------------------------- event watchers

void CallJs(Entry* ctx, Napi::FunctionReference& fn, const std::vector<napi_value>& args) {
  Napi::Env env(ctx->state->env);
  if (fn.IsEmpty()) return;
  fn.MakeCallback(env.Global(), args, *ctx->asyncContext);
  if (env.IsExceptionPending()) {
    Napi::Error err = env.GetAndClearPendingException();
    napi_fatal_exception(env, err.Value());
  }
}

void OnChannelReadable(uv_poll_t* handle, int status, int /*events*/) {
  Entry* ctx = static_cast<Entry*>(handle->data);
  if (ctx == nullptr) return;
  Napi::Env env(ctx->state->env);
  Napi::HandleScope scope(env);
  if (status < 0) {
    std::vector<napi_value> args{env.Null(),
                                 VerbError(env, "uv_poll(completion channel)", -status, uv_strerror(status)).Value()};
    CallJs(ctx, ctx->onCqEvent, args);
    return;
  }
  std::vector<uint32_t> ids;
  for (;;) {
    ibv_cq* cq = nullptr;
    void* cqContext = nullptr;
    if (ibv_get_cq_event(ctx->channel, &cq, &cqContext) != 0) break;  // EAGAIN: drained
    ibv_ack_cq_events(cq, 1);
    uint32_t id = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(cqContext));
    bool seen = false;
    for (uint32_t x : ids) seen = seen || x == id;
    if (!seen) ids.push_back(id);
  }
  if (ids.empty()) return;
  Napi::Array arr = Napi::Array::New(env, ids.size());
  for (size_t i = 0; i < ids.size(); i++) arr.Set(static_cast<uint32_t>(i), ids[i]);
  std::vector<napi_value> args{arr, env.Null()};
  CallJs(ctx, ctx->onCqEvent, args);
}

void OnAsyncReadable(uv_poll_t* handle, int status, int /*events*/) {
  Entry* ctx = static_cast<Entry*>(handle->data);
  if (ctx == nullptr) return;
  Napi::Env env(ctx->state->env);
  Napi::HandleScope scope(env);
  if (status < 0) {
    std::vector<napi_value> args{env.Null(),
                                 VerbError(env, "uv_poll(async events)", -status, uv_strerror(status)).Value()};
    CallJs(ctx, ctx->onAsyncEvent, args);
    return;
  }
  ibv_context* c = static_cast<ibv_context*>(ctx->obj);
  for (;;) {
    ibv_async_event ev;
    if (ibv_get_async_event(c, &ev) != 0) break;  // EAGAIN: drained
    Napi::Object o = Napi::Object::New(env);
    o.Set("type", AsyncEventName(ev.event_type));
    o.Set("typeNumber", static_cast<uint32_t>(ev.event_type));
    switch (ev.event_type) {
      case IBV_EVENT_CQ_ERR:
        o.Set("cq", static_cast<uint32_t>(reinterpret_cast<uintptr_t>(ev.element.cq->cq_context)));
        break;
      case IBV_EVENT_QP_FATAL:
      case IBV_EVENT_QP_REQ_ERR:
      case IBV_EVENT_QP_ACCESS_ERR:
      case IBV_EVENT_COMM_EST:
      case IBV_EVENT_SQ_DRAINED:
      case IBV_EVENT_PATH_MIG:
      case IBV_EVENT_PATH_MIG_ERR:
      case IBV_EVENT_QP_LAST_WQE_REACHED:
        o.Set("qp", static_cast<uint32_t>(reinterpret_cast<uintptr_t>(ev.element.qp->qp_context)));
        break;
      case IBV_EVENT_PORT_ACTIVE:
      case IBV_EVENT_PORT_ERR:
      case IBV_EVENT_LID_CHANGE:
      case IBV_EVENT_PKEY_CHANGE:
      case IBV_EVENT_SM_CHANGE:
      case IBV_EVENT_CLIENT_REREGISTER:
      case IBV_EVENT_GID_CHANGE:
        o.Set("port", ev.element.port_num);
        break;
      default:
        break;
    }
    ibv_ack_async_event(&ev);
    std::vector<napi_value> args{o, env.Null()};
    CallJs(ctx, ctx->onAsyncEvent, args);
    if (handle->data == nullptr) break;  // the listener closed the device
  }
}

void ClosePoll(uv_poll_t*& poll) {
  if (poll == nullptr) return;
  uv_poll_stop(poll);
  poll->data = nullptr;
  uv_close(reinterpret_cast<uv_handle_t*>(poll), [](uv_handle_t* h) { delete reinterpret_cast<uv_poll_t*>(h); });
  poll = nullptr;
}

int SetNonBlocking(int fd) {
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) return errno;
  return 0;
}

// ---------------------------------------------------------------------------------------------- devices

Napi::Value ListDevices(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int n = 0;
  errno = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr) return Throw(env, "ibv_get_device_list", ErrnoOr(ENOSYS));
  Napi::Array arr = Napi::Array::New(env, n);
  for (int i = 0; i < n; i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", ibv_get_device_name(list[i]));
    o.Set("guid", Hex64(ibv_get_device_guid(list[i])));
    o.Set("nodeType", static_cast<int>(list[i]->node_type));
    o.Set("transportType", static_cast<int>(list[i]->transport_type));
    arr.Set(static_cast<uint32_t>(i), o);
  }
  ibv_free_device_list(list);
  return arr;
}

// openDevice(name, onCqEvent(cqIds, err), onAsyncEvent(event, err)) -> Promise<{context}>
Napi::Value OpenDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  State* st = StateOf(info);
  const char* verb = "ibv_open_device";
  if (!info[0].IsString() || !info[1].IsFunction() || !info[2].IsFunction())
    return Throw(env, verb, EINVAL, "expected (name: string, onCqEvent: function, onAsyncEvent: function)");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  struct Out {
    ibv_context* ctx = nullptr;
    ibv_comp_channel* channel = nullptr;
  };
  auto out = std::make_shared<Out>();
  auto onCq = std::make_shared<Napi::FunctionReference>(Napi::Persistent(info[1].As<Napi::Function>()));
  auto onAsync = std::make_shared<Napi::FunctionReference>(Napi::Persistent(info[2].As<Napi::Function>()));
  Job* job = new Job(env, verb);
  job->run = [name, out](std::string& detail) -> int {
    int n = 0;
    errno = 0;
    ibv_device** list = ibv_get_device_list(&n);
    if (list == nullptr) {
      detail = "cannot list RDMA devices: " + std::string(strerror(ErrnoOr(ENOSYS)));
      return ErrnoOr(ENOSYS);
    }
    ibv_device* dev = nullptr;
    std::string names;
    for (int i = 0; i < n; i++) {
      const char* devName = ibv_get_device_name(list[i]);
      if (name == devName) dev = list[i];
      names += (names.empty() ? "" : ", ") + std::string(devName);
    }
    if (dev == nullptr) {
      ibv_free_device_list(list);
      detail = "no RDMA device named " + name + " (devices: " + (names.empty() ? "none" : names) + ")";
      return ENODEV;
    }
    errno = 0;
    out->ctx = ibv_open_device(dev);
    int err = out->ctx == nullptr ? ErrnoOr(ENODEV) : 0;
    ibv_free_device_list(list);
    if (err != 0) return err;
    errno = 0;
    out->channel = ibv_create_comp_channel(out->ctx);
    if (out->channel == nullptr) {
      err = ErrnoOr(ENOMEM);
      detail = "ibv_create_comp_channel failed: " + ErrnoName(err);
      ibv_close_device(out->ctx);
      return err;
    }
    if ((err = SetNonBlocking(out->channel->fd)) != 0 || (err = SetNonBlocking(out->ctx->async_fd)) != 0) {
      detail = "cannot make the event fds non-blocking";
      ibv_destroy_comp_channel(out->channel);
      ibv_close_device(out->ctx);
      return err;
    }
    return 0;
  };
  job->done = [st, out, onCq, onAsync](Napi::Env env) -> Napi::Value {
    Entry* e = Register(st, Kind::Context, out->ctx, {});
    e->channel = out->channel;
    e->onCqEvent = std::move(*onCq);
    e->onAsyncEvent = std::move(*onAsync);
    e->asyncContext = std::make_unique<Napi::AsyncContext>(env, "vrdma.verbs.events");
    e->channelPoll = new uv_poll_t;
    e->asyncPoll = new uv_poll_t;
    uv_poll_init(st->loop, e->channelPoll, out->channel->fd);
    uv_poll_init(st->loop, e->asyncPoll, out->ctx->async_fd);
    e->channelPoll->data = e;
    e->asyncPoll->data = e;
    uv_poll_start(e->channelPoll, UV_READABLE, OnChannelReadable);
    uv_poll_start(e->asyncPoll, UV_READABLE, OnAsyncReadable);
    // Async events alone do not keep the process alive; a CQ a caller waits on does (the channel watcher).
    uv_unref(reinterpret_cast<uv_handle_t*>(e->asyncPoll));
    Napi::Object o = Napi::Object::New(env);
    o.Set("context", e->id);
    o.Set("channelFd", out->channel->fd);
    o.Set("asyncFd", out->ctx->async_fd);
    return o;
  };
  return job->Start();
}

Napi::Value CloseDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  State* st = StateOf(info);
  Entry* e = Lookup(st, env, "ibv_close_device", info[0], Kind::Context, true);
  if (e == nullptr) return env.Undefined();
  e->destroying = true;
  // The watchers go first, on this thread, before their fds are closed by the job.
  ClosePoll(e->channelPoll);
  ClosePoll(e->asyncPoll);
  ibv_context* ctx = static_cast<ibv_context*>(e->obj);
  ibv_comp_channel* channel = e->channel;
  Job* job = new Job(env, "ibv_close_device");
  job->run = [ctx, channel](std::string& detail) -> int {
    if (channel != nullptr && ibv_destroy_comp_channel(channel) != 0) {
      detail = "ibv_destroy_comp_channel failed";
      return ErrnoOr(EBUSY);
    }
    return ibv_close_device(ctx) != 0 ? ErrnoOr(EIO) : 0;
  };
  job->finish = [st, e](bool) { Unregister(st, e); };  // the fds are gone either way
  return job->Start();
}

Napi::Value QueryDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  State* st = StateOf(info);
  Entry* e = Lookup(st, env, "ibv_query_device", info[0], Kind::Context);
  if (e == nullptr) return env.Undefined();
  auto attr = std::make_shared<ibv_device_attr>();
  ibv_context* ctx = static_cast<ibv_context*>(e->obj);
  auto run = [ctx, attr](std::string&) -> int { return ibv_query_device(ctx, attr.get()); };
  return RunJob(env, "ibv_query_device", {e}, run, [attr](Napi::Env env) -> Napi::Value {
    const ibv_device_attr& a = *attr;
    Napi::Object o = Napi::Object::New(env);
    o.Set("fwVer", a.fw_ver);
    o.Set("nodeGuid", Hex64(a.node_guid));
    o.Set("sysImageGuid", Hex64(a.sys_image_guid));
    o.Set("maxMrSize", Napi::BigInt::New(env, static_cast<uint64_t>(a.max_mr_size)));
    o.Set("pageSizeCap", Napi::BigInt::New(env, static_cast<uint64_t>(a.page_size_cap)));
    o.Set("vendorId", a.vendor_id);
    o.Set("vendorPartId", a.vendor_part_id);
    o.Set("hwVer", a.hw_ver);
    o.Set("maxQp", a.max_qp);
    o.Set("maxQpWr", a.max_qp_wr);
    o.Set("deviceCapFlags", a.device_cap_flags);
    o.Set("maxSge", a.max_sge);
    o.Set("maxSgeRd", a.max_sge_rd);
    o.Set("maxCq", a.max_cq);
    o.Set("maxCqe", a.max_cqe);
    o.Set("maxMr", a.max_mr);
    o.Set("maxPd", a.max_pd);
    o.Set("maxQpRdAtom", a.max_qp_rd_atom);
    o.Set("maxQpInitRdAtom", a.max_qp_init_rd_atom);
    o.Set("atomicCap", static_cast<int>(a.atomic_cap));
    o.Set("maxAh", a.max_ah);
    o.Set("maxPkeys", a.max_pkeys);
    o.Set("physPortCnt", a.phys_port_cnt);
    return o;
  });
}

Napi::Value QueryPort(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_query_port", Kind::Context, e);
  uint64_t port = 0;
  if (!ReadUint(env, verb, "port", info[1], 255, &port)) return env.Undefined();
  auto attr = std::make_shared<ibv_port_attr>();
  ibv_context* ctx = static_cast<ibv_context*>(e->obj);
  auto run = [ctx, attr, port](std::string&) -> int { return ibv_query_port(ctx, static_cast<uint8_t>(port), attr.get()); };
  return RunJob(env, verb, {e}, run, [attr](Napi::Env env) -> Napi::Value {
    const ibv_port_attr& a = *attr;
    Napi::Object o = Napi::Object::New(env);
    o.Set("state", static_cast<int>(a.state));
    o.Set("maxMtu", static_cast<int>(a.max_mtu));
    o.Set("activeMtu", static_cast<int>(a.active_mtu));
    o.Set("gidTblLen", a.gid_tbl_len);
    o.Set("portCapFlags", a.port_cap_flags);
    o.Set("maxMsgSz", a.max_msg_sz);
    o.Set("pkeyTblLen", a.pkey_tbl_len);
    o.Set("lid", a.lid);
    o.Set("smLid", a.sm_lid);
    o.Set("lmc", a.lmc);
    o.Set("activeWidth", a.active_width);
    o.Set("activeSpeed", a.active_speed);
    o.Set("physState", a.phys_state);
    o.Set("linkLayer", a.link_layer);
    return o;
  });
}

Napi::Value QueryGidTable(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_query_gid_table", Kind::Context, e);
  auto entries = std::make_shared<std::vector<ibv_gid_entry>>(MAX_GID_ENTRIES);
  auto count = std::make_shared<ssize_t>(0);
  ibv_context* ctx = static_cast<ibv_context*>(e->obj);
  auto run = [ctx, entries, count](std::string&) -> int {
    *count = ibv_query_gid_table(ctx, entries->data(), entries->size(), 0);
    return *count < 0 ? static_cast<int>(-*count) : 0;
  };
  return RunJob(env, verb, {e}, run, [entries, count](Napi::Env env) -> Napi::Value {
    Napi::Array arr = Napi::Array::New(env, static_cast<size_t>(*count));
    for (ssize_t i = 0; i < *count; i++) {
      const ibv_gid_entry& g = (*entries)[static_cast<size_t>(i)];
      Napi::Object o = Napi::Object::New(env);
      o.Set("gid", GidToJs(env, g.gid));
      o.Set("index", g.gid_index);
      o.Set("port", g.port_num);
      o.Set("type", g.gid_type);
      o.Set("ndevIfindex", g.ndev_ifindex);
      arr.Set(static_cast<uint32_t>(i), o);
    }
    return arr;
  });
}

// ---------------------------------------------------------------------------------------------- PD

Napi::Value AllocPd(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_alloc_pd", Kind::Context, ctxE);
  auto pd = std::make_shared<ibv_pd*>(nullptr);
  ibv_context* ctx = static_cast<ibv_context*>(ctxE->obj);
  auto run = [ctx, pd](std::string&) -> int {
    errno = 0;
    *pd = ibv_alloc_pd(ctx);
    return CreatedOr(*pd, ENOMEM);
  };
  return RunJob(env, verb, {ctxE}, run, [st, ctxE, pd](Napi::Env env) -> Napi::Value {
    return Napi::Number::New(env, Register(st, Kind::Pd, *pd, {ctxE->id})->id);
  });
}

// A destroy verb: marks the handle invalid now, destroys on the pool, unregisters on success and restores the
// handle if libibverbs refused (the object still exists then).
template <typename Fn>
Napi::Value Destroy(const Napi::CallbackInfo& info, const char* verb, Kind kind, Fn destroyFn) {
  Napi::Env env = info.Env();
  State* st = StateOf(info);
  Entry* e = Lookup(st, env, verb, info[0], kind, true);
  if (e == nullptr) return env.Undefined();
  e->destroying = true;
  void* obj = e->obj;
  Job* job = new Job(env, verb);
  job->run = [obj, destroyFn](std::string&) -> int {
    int rc = destroyFn(obj);
    return rc == 0 ? 0 : (rc > 0 ? rc : ErrnoOr(EIO));
  };
  job->finish = [st, e](bool ok) {
    if (ok) {
      e->memory.Reset();
      Unregister(st, e);
    } else {
      e->destroying = false;
    }
  };
  return job->Start();
}

Napi::Value DeallocPd(const Napi::CallbackInfo& info) {
  return Destroy(info, "ibv_dealloc_pd", Kind::Pd, [](void* o) { return ibv_dealloc_pd(static_cast<ibv_pd*>(o)); });
}

// ---------------------------------------------------------------------------------------------- CQ

Napi::Value CreateCq(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_create_cq", Kind::Context, ctxE);
  uint64_t cqe = 0, vector = 0;
  if (!ReadUint(env, verb, "cqe", info[1], 0x7fffffff, &cqe)) return env.Undefined();
  if (!info[2].IsUndefined() && !ReadUint(env, verb, "compVector", info[2], 0x7fffffff, &vector))
    return env.Undefined();
  ibv_context* ctx = static_cast<ibv_context*>(ctxE->obj);
  ibv_comp_channel* channel = ctxE->channel;
  auto cq = std::make_shared<ibv_cq*>(nullptr);
  // The CQ's context pointer carries its handle so channel and async events name it; the id is reserved now.
  uint32_t id = st->nextId++;
  auto run = [ctx, channel, cq, cqe, vector, id](std::string&) -> int {
    errno = 0;
    *cq = ibv_create_cq(ctx, static_cast<int>(cqe), reinterpret_cast<void*>(static_cast<uintptr_t>(id)), channel,
                        static_cast<int>(vector));
    return CreatedOr(*cq, ENOMEM);
  };
  return RunJob(env, verb, {ctxE}, run, [st, ctxE, cq, id](Napi::Env env) -> Napi::Value {
    Entry* e = Register(st, Kind::Cq, *cq, {ctxE->id}, id);
    Napi::Object o = Napi::Object::New(env);
    o.Set("cq", e->id);
    o.Set("cqe", (*cq)->cqe);
    return o;
  });
}

Napi::Value DestroyCq(const Napi::CallbackInfo& info) {
  std::shared_ptr<Completions> completions = StateOf(info)->completions;
  return Destroy(info, "ibv_destroy_cq", Kind::Cq, [completions](void* o) {
    ibv_cq* cq = static_cast<ibv_cq*>(o);
    int rc = ibv_destroy_cq(cq);
    if (rc == 0) {
      std::lock_guard<std::mutex> lock(completions->mu);
      completions->taken.erase(cq);
    }
    return rc;
  });
}

Napi::Value ReqNotifyCq(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* verb = "ibv_req_notify_cq";
  Entry* e = Lookup(StateOf(info), env, verb, info[0], Kind::Cq);
  if (e == nullptr) return env.Undefined();
  int solicitedOnly = info[1].IsBoolean() && info[1].As<Napi::Boolean>().Value() ? 1 : 0;
  int rc = ibv_req_notify_cq(static_cast<ibv_cq*>(e->obj), solicitedOnly);
  if (rc != 0) return Throw(env, verb, rc);
  return env.Undefined();
}

// Retires the work `wc` (polled from `cq`) completes from its QP's outstanding work (caller holds
// Completions::mu).
void Account(Completions& c, ibv_cq* cq, const ibv_wc& wc) {
  auto it = c.byQpNum.find(wc.qp_num);
  if (it == c.byQpNum.end()) return;  // a QP already destroyed
  QpWork& work = it->second;
  bool isRecv;
  if (wc.status == IBV_WC_SUCCESS)
    isRecv = (wc.opcode & IBV_WC_RECV) != 0;
  else if (work.sendCq != work.recvCq)
    isRecv = cq == work.recvCq;
  else
    isRecv = !work.recvs.empty() && work.recvs.front() == wc.wr_id &&
             !(!work.sends.empty() && work.sends.front().wrId == wc.wr_id && (wc.opcode & IBV_WC_RECV) == 0);
  if (isRecv)
    work.RetireRecv(wc.wr_id);
  else
    work.RetireSends(wc.wr_id, wc.status == IBV_WC_SUCCESS);
}

// Polls `cq` empty into Completions::taken (for JS's next pollCq), accounting each (caller holds mu).
int TakeCompletions(Completions& c, ibv_cq* cq) {
  ibv_wc wcs[WC_BATCH];
  for (;;) {
    int n = ibv_poll_cq(cq, WC_BATCH, wcs);
    if (n < 0) return EIO;
    if (n == 0) return 0;
    std::deque<ibv_wc>& taken = c.taken[cq];
    for (int i = 0; i < n; i++) {
      Account(c, cq, wcs[i]);
      taken.push_back(wcs[i]);
    }
  }
}

void WriteWc(uint8_t* p, const ibv_wc& wc) {
  auto u16 = [&](size_t off, uint16_t v) { memcpy(p + off, &v, 2); };
  auto u32 = [&](size_t off, uint32_t v) { memcpy(p + off, &v, 4); };
  auto u64 = [&](size_t off, uint64_t v) { memcpy(p + off, &v, 8); };
  u64(0, wc.wr_id);
  u32(8, static_cast<uint32_t>(wc.status));
  u32(12, static_cast<uint32_t>(wc.opcode));
  u32(16, wc.vendor_err);
  u32(20, wc.byte_len);
  // imm_data is big-endian on the wire and in ibv_wc; JS sees the value it posted.
  u32(24, (wc.wc_flags & IBV_WC_WITH_IMM) ? ntohl(wc.imm_data) : wc.imm_data);
  u32(28, wc.qp_num);
  u32(32, wc.src_qp);
  u32(36, wc.wc_flags);
  u16(40, wc.pkey_index);
  u16(42, wc.slid);
  p[44] = wc.sl;
  p[45] = wc.dlid_path_bits;
  u16(46, 0);
}

// pollCq(cq, out: Uint8Array, maxEntries) -> number of completions written to `out`.
Napi::Value PollCq(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* verb = "ibv_poll_cq";
  Entry* e = Lookup(StateOf(info), env, verb, info[0], Kind::Cq);
  if (e == nullptr) return env.Undefined();
  uint8_t* out = nullptr;
  size_t outLen = 0;
  uint64_t max = 0;
  if (!ReadBytes(env, verb, "out", info[1], &out, &outLen) ||
      !ReadUint(env, verb, "maxEntries", info[2], MAX_WC_PER_POLL, &max))
    return env.Undefined();
  if (max * WC_BYTES > outLen)
    return Throw(env, verb, EINVAL,
                 "out holds " + std::to_string(outLen / WC_BYTES) + " completions, maxEntries is " +
                     std::to_string(max));
  ibv_cq* cq = static_cast<ibv_cq*>(e->obj);
  Completions& c = *StateOf(info)->completions;
  std::lock_guard<std::mutex> lock(c.mu);
  uint32_t total = 0;
  // Completions a QP's destroy took off this CQ while waiting for its flush come first (they are older).
  auto taken = c.taken.find(cq);
  if (taken != c.taken.end()) {
    for (; total < max && !taken->second.empty(); total++) {
      WriteWc(out + static_cast<size_t>(total) * WC_BYTES, taken->second.front());
      taken->second.pop_front();
    }
    if (taken->second.empty()) c.taken.erase(taken);
  }
  ibv_wc wcs[WC_BATCH];
  while (total < max) {
    int want = static_cast<int>(std::min<uint64_t>(WC_BATCH, max - total));
    int n = ibv_poll_cq(cq, want, wcs);
    if (n < 0) return Throw(env, verb, n == -1 ? EIO : -n, "the CQ is in error");
    for (int i = 0; i < n; i++) {
      Account(c, cq, wcs[i]);
      WriteWc(out + static_cast<size_t>(total + i) * WC_BYTES, wcs[i]);
    }
    total += static_cast<uint32_t>(n);
    if (n < want) break;
  }
  return Napi::Number::New(env, total);
}

// ---------------------------------------------------------------------------------------------- QP

Napi::Value CreateQp(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_create_qp", Kind::Pd, pdE);
  if (!info[1].IsObject()) return Throw(env, verb, EINVAL, "init attributes must be an object");
  Napi::Object o = info[1].As<Napi::Object>();
  auto attr = std::make_shared<ibv_qp_init_attr>();
  memset(attr.get(), 0, sizeof *attr);
  uint32_t type = 0;
  uint32_t sendCqId = 0, recvCqId = 0;
  if (!ReadRequired(env, verb, o, "qpType", &type) || !ReadRequired(env, verb, o, "sendCq", &sendCqId) ||
      !ReadRequired(env, verb, o, "recvCq", &recvCqId) ||
      !ReadRequired(env, verb, o, "maxSendWr", &attr->cap.max_send_wr) ||
      !ReadRequired(env, verb, o, "maxRecvWr", &attr->cap.max_recv_wr) ||
      !ReadRequired(env, verb, o, "maxSendSge", &attr->cap.max_send_sge, MAX_SGE_PER_WR) ||
      !ReadRequired(env, verb, o, "maxRecvSge", &attr->cap.max_recv_sge, MAX_SGE_PER_WR) ||
      !ReadField(env, verb, o, "maxInlineData", &attr->cap.max_inline_data, nullptr))
    return env.Undefined();
  if (type != IBV_QPT_RC && type != IBV_QPT_UD)
    return Throw(env, verb, EINVAL, "qpType " + std::to_string(type) + " is not RC (2) or UD (4)");
  attr->qp_type = static_cast<ibv_qp_type>(type);
  attr->sq_sig_all = ReadBool(o, "sqSigAll") ? 1 : 0;
  Entry* sendCq = Lookup(st, env, verb, Napi::Number::New(env, sendCqId), Kind::Cq);
  if (sendCq == nullptr) return env.Undefined();
  Entry* recvCq = Lookup(st, env, verb, Napi::Number::New(env, recvCqId), Kind::Cq);
  if (recvCq == nullptr) return env.Undefined();
  attr->send_cq = static_cast<ibv_cq*>(sendCq->obj);
  attr->recv_cq = static_cast<ibv_cq*>(recvCq->obj);
  uint32_t id = st->nextId++;
  attr->qp_context = reinterpret_cast<void*>(static_cast<uintptr_t>(id));
  ibv_pd* pd = static_cast<ibv_pd*>(pdE->obj);
  auto qp = std::make_shared<ibv_qp*>(nullptr);
  std::shared_ptr<Completions> completions = st->completions;
  auto run = [pd, attr, qp, completions](std::string&) -> int {
    errno = 0;
    *qp = ibv_create_qp(pd, attr.get());
    if (*qp == nullptr) return ErrnoOr(ENOMEM);
    {
      std::lock_guard<std::mutex> lock(completions->mu);
      QpWork& work = completions->byQpNum[(*qp)->qp_num];
      work = QpWork{};
      work.signalAll = attr->sq_sig_all != 0;
      work.sendCq = attr->send_cq;
      work.recvCq = attr->recv_cq;
    }
    // Providers may round the queues up without writing the result back (rxe does): ask for the real ones.
    ibv_qp_attr actual;
    ibv_qp_init_attr init;
    if (ibv_query_qp(*qp, &actual, IBV_QP_CAP, &init) == 0) attr->cap = actual.cap;
    return 0;
  };
  return RunJob(env, verb, {pdE, sendCq, recvCq}, run, [st, qp, attr, id, pdE, sendCq, recvCq](Napi::Env env) -> Napi::Value {
    std::vector<uint32_t> parents{pdE->id, sendCq->id};
    if (recvCq != sendCq) parents.push_back(recvCq->id);
    Entry* e = Register(st, Kind::Qp, *qp, parents, id);
    e->qpType = attr->qp_type;
    Napi::Object r = Napi::Object::New(env);
    r.Set("qp", e->id);
    r.Set("qpNum", (*qp)->qp_num);
    r.Set("cap", CapToJs(env, attr->cap));
    return r;
  });
}

// modifyQp(qp, attrs): the attribute mask is the set of attributes present in `attrs`.
Napi::Value ModifyQp(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_modify_qp", Kind::Qp, e);
  if (!info[1].IsObject()) return Throw(env, verb, EINVAL, "attributes must be an object");
  Napi::Object o = info[1].As<Napi::Object>();
  auto attr = std::make_shared<ibv_qp_attr>();
  memset(attr.get(), 0, sizeof *attr);
  int mask = 0;
  bool p = false;
  uint32_t u = 0;
#define QP_FIELD(js, field, bit, max)                                                   \
  if (!ReadField(env, verb, o, js, &attr->field, &p, max)) return env.Undefined();      \
  if (p) mask |= (bit);
  if (!ReadField(env, verb, o, "qpState", &u, &p, IBV_QPS_ERR)) return env.Undefined();
  if (p) {
    attr->qp_state = static_cast<ibv_qp_state>(u);
    mask |= IBV_QP_STATE;
  }
  if (!ReadField(env, verb, o, "pathMtu", &u, &p, IBV_MTU_4096)) return env.Undefined();
  if (p) {
    attr->path_mtu = static_cast<ibv_mtu>(u);
    mask |= IBV_QP_PATH_MTU;
  }
  QP_FIELD("pkeyIndex", pkey_index, IBV_QP_PKEY_INDEX, 0xffff)
  QP_FIELD("portNum", port_num, IBV_QP_PORT, 0xff)
  QP_FIELD("qpAccessFlags", qp_access_flags, IBV_QP_ACCESS_FLAGS, 0xffffffffu)
  QP_FIELD("qkey", qkey, IBV_QP_QKEY, 0xffffffffu)
  QP_FIELD("destQpNum", dest_qp_num, IBV_QP_DEST_QPN, 0xffffff)
  QP_FIELD("rqPsn", rq_psn, IBV_QP_RQ_PSN, 0xffffff)
  QP_FIELD("sqPsn", sq_psn, IBV_QP_SQ_PSN, 0xffffff)
  QP_FIELD("maxRdAtomic", max_rd_atomic, IBV_QP_MAX_QP_RD_ATOMIC, 0xff)
  QP_FIELD("maxDestRdAtomic", max_dest_rd_atomic, IBV_QP_MAX_DEST_RD_ATOMIC, 0xff)
  QP_FIELD("minRnrTimer", min_rnr_timer, IBV_QP_MIN_RNR_TIMER, 31)
  QP_FIELD("timeout", timeout, IBV_QP_TIMEOUT, 31)
  QP_FIELD("retryCnt", retry_cnt, IBV_QP_RETRY_CNT, 7)
  QP_FIELD("rnrRetry", rnr_retry, IBV_QP_RNR_RETRY, 7)
#undef QP_FIELD
  Napi::Value ah = o.Get("ahAttr");
  if (!ah.IsUndefined()) {
    if (!ReadAhAttr(env, verb, ah, &attr->ah_attr)) return env.Undefined();
    mask |= IBV_QP_AV;
  }
  if (mask == 0) return Throw(env, verb, EINVAL, "no attribute given");
  ibv_qp* qp = static_cast<ibv_qp*>(e->obj);
  return RunJob(env, verb, {e}, [qp, attr, mask](std::string&) -> int { return ibv_modify_qp(qp, attr.get(), mask); });
}

Napi::Value QueryQp(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_query_qp", Kind::Qp, e);
  ibv_qp* qp = static_cast<ibv_qp*>(e->obj);
  struct Out {
    ibv_qp_attr attr;
    ibv_qp_init_attr init;
  };
  auto out = std::make_shared<Out>();
  memset(out.get(), 0, sizeof *out);
  auto run = [qp, out](std::string&) -> int {
    int mask = IBV_QP_STATE | IBV_QP_CUR_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS |
               IBV_QP_QKEY | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
               IBV_QP_RQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER | IBV_QP_SQ_PSN |
               IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_DEST_QPN | IBV_QP_CAP;
    return ibv_query_qp(qp, &out->attr, mask, &out->init);
  };
  return RunJob(env, verb, {e}, run, [out, qp](Napi::Env env) -> Napi::Value {
    const ibv_qp_attr& a = out->attr;
    Napi::Object o = Napi::Object::New(env);
    o.Set("qpNum", qp->qp_num);
    o.Set("qpType", static_cast<int>(qp->qp_type));
    o.Set("qpState", static_cast<int>(a.qp_state));
    o.Set("curQpState", static_cast<int>(a.cur_qp_state));
    o.Set("pathMtu", static_cast<int>(a.path_mtu));
    o.Set("qkey", a.qkey);
    o.Set("rqPsn", a.rq_psn);
    o.Set("sqPsn", a.sq_psn);
    o.Set("destQpNum", a.dest_qp_num);
    o.Set("qpAccessFlags", a.qp_access_flags);
    o.Set("pkeyIndex", a.pkey_index);
    o.Set("portNum", a.port_num);
    o.Set("maxRdAtomic", a.max_rd_atomic);
    o.Set("maxDestRdAtomic", a.max_dest_rd_atomic);
    o.Set("minRnrTimer", a.min_rnr_timer);
    o.Set("timeout", a.timeout);
    o.Set("retryCnt", a.retry_cnt);
    o.Set("rnrRetry", a.rnr_retry);
    o.Set("ahAttr", AhAttrToJs(env, a.ah_attr));
    o.Set("cap", CapToJs(env, a.cap));
    o.Set("sqSigAll", out->init.sq_sig_all != 0);
    return o;
  });
}

// The QP goes to ERR first: its outstanding work requests then complete with IBV_WC_WR_FLUSH_ERR on its CQs
// (where they stay pollable after the QP is gone). ibv_destroy_qp alone drops them silently on rxe: rxe flushes
// from a tasklet that the modify only schedules and that destroy cancels. No verb reports when a flush is done,
// so the destroy (on the thread pool) polls the QP's CQs, keeping what it takes for JS's next pollCq, until every
// receive and every signaled send the QP had outstanding has completed (see QpWork), at most FLUSH_LIMIT (a CQ
// that overflowed loses completions; the QP is destroyed then anyway).
constexpr auto FLUSH_LIMIT = std::chrono::milliseconds(5000);
constexpr useconds_t FLUSH_POLL_INTERVAL_US = 200;

// True once the QP numbered `qpNum` has nothing outstanding; false if FLUSH_LIMIT passed first.
bool AwaitFlush(Completions& c, uint32_t qpNum, ibv_cq* sendCq, ibv_cq* recvCq) {
  const auto deadline = std::chrono::steady_clock::now() + FLUSH_LIMIT;
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(c.mu);
      auto drained = [&] {
        auto it = c.byQpNum.find(qpNum);
        return it == c.byQpNum.end() || it->second.Drained();
      };
      if (drained()) return true;
      if (TakeCompletions(c, sendCq) != 0 || (recvCq != sendCq && TakeCompletions(c, recvCq) != 0)) return false;
      if (drained()) return true;
    }
    if (std::chrono::steady_clock::now() >= deadline) return false;
    usleep(FLUSH_POLL_INTERVAL_US);
  }
}

Napi::Value DestroyQp(const Napi::CallbackInfo& info) {
  std::shared_ptr<Completions> completions = StateOf(info)->completions;
  return Destroy(info, "ibv_destroy_qp", Kind::Qp, [completions](void* o) {
    ibv_qp* qp = static_cast<ibv_qp*>(o);
    const uint32_t qpNum = qp->qp_num;
    ibv_qp_attr attr;
    ibv_qp_init_attr init;
    memset(&attr, 0, sizeof attr);
    bool needsFlush = ibv_query_qp(qp, &attr, IBV_QP_STATE, &init) != 0 || attr.qp_state != IBV_QPS_RESET;
    memset(&attr, 0, sizeof attr);
    attr.qp_state = IBV_QPS_ERR;
    // A QP in RESET holds no work; one that cannot go to ERR has nothing to flush.
    if (needsFlush && ibv_modify_qp(qp, &attr, IBV_QP_STATE) == 0) AwaitFlush(*completions, qpNum, qp->send_cq, qp->recv_cq);
    int rc = ibv_destroy_qp(qp);
    if (rc == 0) {
      std::lock_guard<std::mutex> lock(completions->mu);
      completions->byQpNum.erase(qpNum);
    }
    return rc;
  });
}

// ---------------------------------------------------------------------------------------------- MR

// regMr(pd, memory: ArrayBuffer, offset, length, access, iova?) -> Promise<{mr, lkey, rkey, addr}>
Napi::Value RegMr(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  State* st = StateOf(info);
  const bool withIova = !info[5].IsUndefined();
  const char* verb = withIova ? "ibv_reg_mr_iova" : "ibv_reg_mr";
  Entry* pdE = Lookup(st, env, verb, info[0], Kind::Pd);
  if (pdE == nullptr) return env.Undefined();
  if (!info[1].IsArrayBuffer()) return Throw(env, verb, EINVAL, "memory must be an ArrayBuffer");
  Napi::ArrayBuffer ab = info[1].As<Napi::ArrayBuffer>();
  if (ab.IsDetached()) return Throw(env, verb, EINVAL, "memory is a detached ArrayBuffer");
  uint64_t offset = 0, length = 0, access = 0, iova = 0;
  if (!ReadUint(env, verb, "offset", info[2], 0xffffffffffffull, &offset) ||
      !ReadUint(env, verb, "length", info[3], 0xffffffffffffull, &length) ||
      !ReadUint(env, verb, "access", info[4], 0x7fffffff, &access))
    return env.Undefined();
  if (withIova && !ReadU64(env, verb, "iova", info[5], &iova)) return env.Undefined();
  if (length == 0) return Throw(env, verb, EINVAL, "length is 0");
  if (offset > ab.ByteLength() || length > ab.ByteLength() - offset)
    return Throw(env, verb, EINVAL,
                 "range " + std::to_string(offset) + "+" + std::to_string(length) + " is outside the " +
                     std::to_string(ab.ByteLength()) + "-byte buffer");
  uint8_t* addr = static_cast<uint8_t*>(ab.Data()) + offset;
  // The kernel (ib_uverbs_reg_mr) requires the iova to sit at the same offset within a page as the memory.
  const uint64_t pageMask = static_cast<uint64_t>(sysconf(_SC_PAGESIZE)) - 1;
  if (withIova && (iova & pageMask) != (reinterpret_cast<uintptr_t>(addr) & pageMask))
    return Throw(env, verb, EINVAL,
                 "iova offset within a page (" + std::to_string(iova & pageMask) +
                     ") differs from the memory's (" + std::to_string(reinterpret_cast<uintptr_t>(addr) & pageMask) +
                     ")");
  ibv_pd* pd = static_cast<ibv_pd*>(pdE->obj);
  auto mr = std::make_shared<ibv_mr*>(nullptr);
  auto memory = std::make_shared<Napi::Reference<Napi::ArrayBuffer>>(Napi::Persistent(ab));
  auto run = [pd, addr, length, access, iova, withIova, mr](std::string&) -> int {
    errno = 0;
    *mr = withIova ? ibv_reg_mr_iova2(pd, addr, length, iova, static_cast<unsigned>(access))
                   : ibv_reg_mr(pd, addr, length, static_cast<int>(access));
    return CreatedOr(*mr, ENOMEM);
  };
  return RunJob(env, verb, {pdE}, run, [st, pdE, mr, memory, withIova, iova, addr](Napi::Env env) -> Napi::Value {
    Entry* e = Register(st, Kind::Mr, *mr, {pdE->id});
    e->memory = std::move(*memory);
    Napi::Object o = Napi::Object::New(env);
    o.Set("mr", e->id);
    o.Set("lkey", (*mr)->lkey);
    o.Set("rkey", (*mr)->rkey);
    uint64_t a = withIova ? iova : reinterpret_cast<uintptr_t>(addr);
    o.Set("addr", Napi::BigInt::New(env, a));
    return o;
  });
}

Napi::Value DeregMr(const Napi::CallbackInfo& info) {
  return Destroy(info, "ibv_dereg_mr", Kind::Mr, [](void* o) { return ibv_dereg_mr(static_cast<ibv_mr*>(o)); });
}

// The process address of byte `offset` of an ArrayBuffer: what a work request names for memory registered
// without an iova.
Napi::Value BufferAddress(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsArrayBuffer()) return Throw(env, "bufferAddress", EINVAL, "memory must be an ArrayBuffer");
  Napi::ArrayBuffer ab = info[0].As<Napi::ArrayBuffer>();
  return Napi::BigInt::New(env, static_cast<uint64_t>(reinterpret_cast<uintptr_t>(ab.Data())));
}

// ---------------------------------------------------------------------------------------------- AH

Napi::Value CreateAh(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_create_ah", Kind::Pd, pdE);
  auto attr = std::make_shared<ibv_ah_attr>();
  if (!ReadAhAttr(env, verb, info[1], attr.get())) return env.Undefined();
  ibv_pd* pd = static_cast<ibv_pd*>(pdE->obj);
  auto ah = std::make_shared<ibv_ah*>(nullptr);
  auto run = [pd, attr, ah](std::string&) -> int {
    errno = 0;
    *ah = ibv_create_ah(pd, attr.get());
    return CreatedOr(*ah, EINVAL);
  };
  return RunJob(env, verb, {pdE}, run, [st, pdE, ah](Napi::Env env) -> Napi::Value {
    return Napi::Number::New(env, Register(st, Kind::Ah, *ah, {pdE->id})->id);
  });
}

Napi::Value DestroyAh(const Napi::CallbackInfo& info) {
  return Destroy(info, "ibv_destroy_ah", Kind::Ah, [](void* o) { return ibv_destroy_ah(static_cast<ibv_ah*>(o)); });
}

// ---------------------------------------------------------------------------------------------- post

uint32_t LoadU32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}
uint64_t LoadU64(const uint8_t* p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}

// Checks a list's work request count and empties the SGE scratch space. Returns false after throwing.
bool StartList(Napi::Env env, State* st, const char* verb, uint32_t count) {
  if (count == 0 || count > MAX_WRS_PER_POST) {
    Throw(env, verb, EINVAL, "work request count " + std::to_string(count) + " is not in 1.." +
                                 std::to_string(MAX_WRS_PER_POST));
    return false;
  }
  st->sges.clear();
  st->sgeStart.resize(count);
  return true;
}

// Appends work request `index`'s `numSge` SGEs at `*off` to st->sges (recording where they start) and moves
// `*off` past them. Returns false after throwing.
bool ParseSges(Napi::Env env, State* st, const char* verb, const uint8_t* buf, size_t len, uint32_t index,
               uint32_t numSge, size_t* off) {
  if (numSge > MAX_SGE_PER_WR) {
    Throw(env, verb, EINVAL, "work request " + std::to_string(index) + " has " + std::to_string(numSge) +
                                 " SGEs, more than " + std::to_string(MAX_SGE_PER_WR));
    return false;
  }
  if ((len - *off) / SGE_BYTES < numSge) {
    Throw(env, verb, EINVAL, "the SGEs of work request " + std::to_string(index) + " run past the end of the buffer");
    return false;
  }
  st->sgeStart[index] = st->sges.size();
  for (uint32_t s = 0; s < numSge; s++) {
    const uint8_t* q = buf + *off;
    st->sges.push_back(ibv_sge{LoadU64(q), LoadU32(q + 8), LoadU32(q + 12)});
    *off += SGE_BYTES;
  }
  return true;
}

// The header of work request `index` at `off`, or nullptr after throwing when the buffer ends before it does.
const uint8_t* WrHeader(Napi::Env env, const char* verb, const uint8_t* buf, size_t len, size_t off, uint32_t index,
                        size_t headerBytes) {
  if (off > len || len - off < headerBytes) {
    Throw(env, verb, EINVAL, "work request " + std::to_string(index) + " runs past the end of the buffer");
    return nullptr;
  }
  return buf + off;
}

// Points each parsed WR at its SGEs and at the next WR. Only once all are parsed: st->sges may have moved while
// growing.
template <typename Wr>
void LinkList(State* st, std::vector<Wr>& wrs, uint32_t count) {
  for (uint32_t i = 0; i < count; i++) {
    Wr& wr = wrs[i];
    wr.sg_list = wr.num_sge > 0 ? &st->sges[st->sgeStart[i]] : nullptr;
    wr.next = i + 1 < count ? &wrs[i + 1] : nullptr;
  }
}

// Parses `count` send WRs from `buf` into st->sendWrs/st->sges, linked. `resolveAh` looks AH handles up (a UD
// QP); without it, the raw handle is kept in wr.ud.ah's place for the layout self-test. Returns false after
// throwing.
bool ParseSendList(Napi::Env env, State* st, const char* verb, const uint8_t* buf, size_t len, uint32_t count,
                   bool isUd, bool resolveAh) {
  if (!StartList(env, st, verb, count)) return false;
  st->sendWrs.resize(count);
  size_t off = 0;
  for (uint32_t i = 0; i < count; i++) {
    const uint8_t* p = WrHeader(env, verb, buf, len, off, i, SEND_WR_HEADER_BYTES);
    if (p == nullptr) return false;
    ibv_send_wr& wr = st->sendWrs[i];
    memset(&wr, 0, sizeof wr);
    wr.wr_id = LoadU64(p);
    wr.opcode = static_cast<ibv_wr_opcode>(LoadU32(p + 8));
    wr.send_flags = LoadU32(p + 12);
    uint32_t numSge = LoadU32(p + 16);
    uint32_t imm = LoadU32(p + 20);
    if (wr.opcode == IBV_WR_SEND_WITH_INV || wr.opcode == IBV_WR_LOCAL_INV)
      wr.invalidate_rkey = imm;
    else
      wr.imm_data = htonl(imm);
    uint64_t remoteAddr = LoadU64(p + 24);
    uint32_t rkey = LoadU32(p + 32);
    uint32_t ahId = LoadU32(p + 36);
    if (isUd) {
      if (resolveAh) {
        Entry* ah = Lookup(st, env, verb, Napi::Number::New(env, ahId), Kind::Ah);
        if (ah == nullptr) return false;
        wr.wr.ud.ah = static_cast<ibv_ah*>(ah->obj);
      } else {
        wr.wr.ud.ah = reinterpret_cast<ibv_ah*>(static_cast<uintptr_t>(ahId));
      }
      wr.wr.ud.remote_qpn = LoadU32(p + 56);
      wr.wr.ud.remote_qkey = LoadU32(p + 60);
    } else if (wr.opcode == IBV_WR_ATOMIC_CMP_AND_SWP || wr.opcode == IBV_WR_ATOMIC_FETCH_AND_ADD) {
      wr.wr.atomic.remote_addr = remoteAddr;
      wr.wr.atomic.rkey = rkey;
      wr.wr.atomic.compare_add = LoadU64(p + 40);
      wr.wr.atomic.swap = LoadU64(p + 48);
    } else {
      wr.wr.rdma.remote_addr = remoteAddr;
      wr.wr.rdma.rkey = rkey;
    }
    off += SEND_WR_HEADER_BYTES;
    if (!ParseSges(env, st, verb, buf, len, i, numSge, &off)) return false;
    wr.num_sge = static_cast<int>(numSge);
  }
  LinkList(st, st->sendWrs, count);
  return true;
}

bool ParseRecvList(Napi::Env env, State* st, const char* verb, const uint8_t* buf, size_t len, uint32_t count) {
  if (!StartList(env, st, verb, count)) return false;
  st->recvWrs.resize(count);
  size_t off = 0;
  for (uint32_t i = 0; i < count; i++) {
    const uint8_t* p = WrHeader(env, verb, buf, len, off, i, RECV_WR_HEADER_BYTES);
    if (p == nullptr) return false;
    ibv_recv_wr& wr = st->recvWrs[i];
    memset(&wr, 0, sizeof wr);
    wr.wr_id = LoadU64(p);
    uint32_t numSge = LoadU32(p + 8);
    off += RECV_WR_HEADER_BYTES;
    if (!ParseSges(env, st, verb, buf, len, i, numSge, &off)) return false;
    wr.num_sge = static_cast<int>(numSge);
  }
  LinkList(st, st->recvWrs, count);
  return true;
}

// On a refused post, the error names the first work request that was not posted (`badWrIndex`): the ones
// before it were posted.
Napi::Value ThrowPostError(Napi::Env env, const char* verb, int rc, uint32_t badIndex) {
  Napi::Error e = VerbError(env, verb, rc, "work request " + std::to_string(badIndex) + " and later not posted");
  e.Set("badWrIndex", Napi::Number::New(env, badIndex));
  e.ThrowAsJavaScriptException();
  return env.Undefined();
}

// The (wrs: Uint8Array, count) arguments of a list verb, at info[first] and info[first + 1].
bool ReadListArgs(const Napi::CallbackInfo& info, const char* verb, size_t first, uint8_t** buf, size_t* len,
                  uint32_t* count) {
  uint64_t n = 0;
  if (!ReadBytes(info.Env(), verb, "wrs", info[first], buf, len) ||
      !ReadUint(info.Env(), verb, "count", info[first + 1], MAX_WRS_PER_POST, &n))
    return false;
  *count = static_cast<uint32_t>(n);
  return true;
}

// Counts the first `posted` WRs of the list just parsed as outstanding on the QP (for the flush at destroy).
void RecordPosted(State* st, uint32_t qpNum, bool send, uint32_t posted) {
  Completions& c = *st->completions;
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.byQpNum.find(qpNum);
  if (it == c.byQpNum.end()) return;
  QpWork& work = it->second;
  if (!send) {
    for (uint32_t i = 0; i < posted; i++) work.recvs.push_back(st->recvWrs[i].wr_id);
    return;
  }
  for (uint32_t i = 0; i < posted; i++)
    work.PushSend(st->sendWrs[i].wr_id, work.signalAll || (st->sendWrs[i].send_flags & IBV_SEND_SIGNALED) != 0);
}

// postSend(qp, wrs: Uint8Array, count) and postRecv(qp, wrs: Uint8Array, count): the whole list in one
// libibverbs call.
Napi::Value PostList(const Napi::CallbackInfo& info, bool send) {
  Napi::Env env = info.Env();
  State* st = StateOf(info);
  const char* verb = send ? "ibv_post_send" : "ibv_post_recv";
  Entry* e = Lookup(st, env, verb, info[0], Kind::Qp);
  if (e == nullptr) return env.Undefined();
  uint8_t* buf = nullptr;
  size_t len = 0;
  uint32_t count = 0;
  if (!ReadListArgs(info, verb, 1, &buf, &len, &count)) return env.Undefined();
  ibv_qp* qp = static_cast<ibv_qp*>(e->obj);
  int rc = 0;
  uint32_t posted = count;
  if (send) {
    if (!ParseSendList(env, st, verb, buf, len, count, e->qpType == IBV_QPT_UD, true)) return env.Undefined();
    ibv_send_wr* bad = nullptr;
    rc = ibv_post_send(qp, st->sendWrs.data(), &bad);
    if (rc != 0) posted = bad != nullptr ? static_cast<uint32_t>(bad - st->sendWrs.data()) : 0;
  } else {
    if (!ParseRecvList(env, st, verb, buf, len, count)) return env.Undefined();
    ibv_recv_wr* bad = nullptr;
    rc = ibv_post_recv(qp, st->recvWrs.data(), &bad);
    if (rc != 0) posted = bad != nullptr ? static_cast<uint32_t>(bad - st->recvWrs.data()) : 0;
  }
  RecordPosted(st, qp->qp_num, send, posted);
  if (rc != 0) return ThrowPostError(env, verb, rc, posted);
  return env.Undefined();
}

Napi::Value PostSend(const Napi::CallbackInfo& info) { return PostList(info, true); }
Napi::Value PostRecv(const Napi::CallbackInfo& info) { return PostList(info, false); }

// ---------------------------------------------------------------------------------------------- layout self-test

Napi::Array SgesToJs(Napi::Env env, const ibv_sge* sgList, int numSge) {
  Napi::Array sges = Napi::Array::New(env, static_cast<size_t>(numSge));
  for (int s = 0; s < numSge; s++) {
    Napi::Object g = Napi::Object::New(env);
    g.Set("addr", Napi::BigInt::New(env, static_cast<uint64_t>(sgList[s].addr)));
    g.Set("length", sgList[s].length);
    g.Set("lkey", sgList[s].lkey);
    sges.Set(static_cast<uint32_t>(s), g);
  }
  return sges;
}

// parseSendWrsForTest(wrs, count, isUd) -> the ibv_send_wr list this file would post, as JS objects.
Napi::Value ParseSendWrsForTest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  State* st = StateOf(info);
  const char* verb = "parseSendWrs";
  uint8_t* buf = nullptr;
  size_t len = 0;
  uint32_t count = 0;
  if (!ReadListArgs(info, verb, 0, &buf, &len, &count)) return env.Undefined();
  bool isUd = info[2].IsBoolean() && info[2].As<Napi::Boolean>().Value();
  if (!ParseSendList(env, st, verb, buf, len, count, isUd, false)) return env.Undefined();
  Napi::Array arr = Napi::Array::New(env, count);
  uint32_t i = 0;
  for (ibv_send_wr* wr = st->sendWrs.data(); wr != nullptr; wr = wr->next, i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("wrId", Napi::BigInt::New(env, static_cast<uint64_t>(wr->wr_id)));
    o.Set("opcode", static_cast<int>(wr->opcode));
    o.Set("sendFlags", wr->send_flags);
    o.Set("immData", ntohl(wr->imm_data));
    if (isUd) {
      o.Set("ah", static_cast<uint32_t>(reinterpret_cast<uintptr_t>(wr->wr.ud.ah)));
      o.Set("remoteQpn", wr->wr.ud.remote_qpn);
      o.Set("remoteQkey", wr->wr.ud.remote_qkey);
    } else if (wr->opcode == IBV_WR_ATOMIC_CMP_AND_SWP || wr->opcode == IBV_WR_ATOMIC_FETCH_AND_ADD) {
      o.Set("remoteAddr", Napi::BigInt::New(env, static_cast<uint64_t>(wr->wr.atomic.remote_addr)));
      o.Set("rkey", wr->wr.atomic.rkey);
      o.Set("compareAdd", Napi::BigInt::New(env, static_cast<uint64_t>(wr->wr.atomic.compare_add)));
      o.Set("swap", Napi::BigInt::New(env, static_cast<uint64_t>(wr->wr.atomic.swap)));
    } else {
      o.Set("remoteAddr", Napi::BigInt::New(env, static_cast<uint64_t>(wr->wr.rdma.remote_addr)));
      o.Set("rkey", wr->wr.rdma.rkey);
    }
    o.Set("sgList", SgesToJs(env, wr->sg_list, wr->num_sge));
    arr.Set(i, o);
  }
  return arr;
}

// parseRecvWrsForTest(wrs, count) -> the ibv_recv_wr list as JS objects.
Napi::Value ParseRecvWrsForTest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  State* st = StateOf(info);
  const char* verb = "parseRecvWrs";
  uint8_t* buf = nullptr;
  size_t len = 0;
  uint32_t count = 0;
  if (!ReadListArgs(info, verb, 0, &buf, &len, &count)) return env.Undefined();
  if (!ParseRecvList(env, st, verb, buf, len, count)) return env.Undefined();
  Napi::Array arr = Napi::Array::New(env, count);
  uint32_t i = 0;
  for (ibv_recv_wr* wr = st->recvWrs.data(); wr != nullptr; wr = wr->next, i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("wrId", Napi::BigInt::New(env, static_cast<uint64_t>(wr->wr_id)));
    o.Set("sgList", SgesToJs(env, wr->sg_list, wr->num_sge));
    arr.Set(i, o);
  }
  return arr;
}

// writeWcForTest(out, index, wc fields object): writes one completion the way pollCq does.
Napi::Value WriteWcForTest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* verb = "writeWc";
  uint8_t* out = nullptr;
  size_t len = 0;
  uint64_t index = 0;
  if (!ReadBytes(env, verb, "out", info[0], &out, &len) || !ReadUint(env, verb, "index", info[1], 1u << 20, &index))
    return env.Undefined();
  if ((index + 1) * WC_BYTES > len) return Throw(env, verb, EINVAL, "index past the end of out");
  if (!info[2].IsObject()) return Throw(env, verb, EINVAL, "wc must be an object");
  Napi::Object o = info[2].As<Napi::Object>();
  ibv_wc wc;
  memset(&wc, 0, sizeof wc);
  uint64_t wrId = 0;
  uint32_t status = 0, opcode = 0, imm = 0;
  if (!ReadU64(env, verb, "wrId", o.Get("wrId"), &wrId) || !ReadRequired(env, verb, o, "status", &status) ||
      !ReadRequired(env, verb, o, "opcode", &opcode) || !ReadRequired(env, verb, o, "vendorErr", &wc.vendor_err) ||
      !ReadRequired(env, verb, o, "byteLen", &wc.byte_len) || !ReadRequired(env, verb, o, "immData", &imm) ||
      !ReadRequired(env, verb, o, "qpNum", &wc.qp_num) || !ReadRequired(env, verb, o, "srcQp", &wc.src_qp) ||
      !ReadRequired(env, verb, o, "wcFlags", &wc.wc_flags) || !ReadRequired(env, verb, o, "pkeyIndex", &wc.pkey_index) ||
      !ReadRequired(env, verb, o, "slid", &wc.slid) || !ReadRequired(env, verb, o, "sl", &wc.sl) ||
      !ReadRequired(env, verb, o, "dlidPathBits", &wc.dlid_path_bits))
    return env.Undefined();
  wc.wr_id = wrId;
  wc.status = static_cast<ibv_wc_status>(status);
  wc.opcode = static_cast<ibv_wc_opcode>(opcode);
  wc.imm_data = (wc.wc_flags & IBV_WC_WITH_IMM) ? htonl(imm) : imm;
  WriteWc(out + index * WC_BYTES, wc);
  return env.Undefined();
}

// ---------------------------------------------------------------------------------------------- teardown

// Releases what is still alive when the environment ends, children before parents. Objects with a job still
// running on the pool are left to the kernel (the process is ending; touching them would race the job).
void Cleanup(void* arg) {
  State* st = static_cast<State*>(arg);
  const Kind order[] = {Kind::Qp, Kind::Ah, Kind::Mr, Kind::Cq, Kind::Pd, Kind::Context};
  for (Kind kind : order) {
    std::vector<Entry*> victims;
    for (auto& [id, e] : st->entries)
      if (e->kind == kind && !e->destroying && e->pending == 0) victims.push_back(e.get());
    for (Entry* e : victims) {
      if (e->children > 0) continue;  // a child is busy: leave the parent to the kernel too
      switch (kind) {
        case Kind::Qp: ibv_destroy_qp(static_cast<ibv_qp*>(e->obj)); break;
        case Kind::Ah: ibv_destroy_ah(static_cast<ibv_ah*>(e->obj)); break;
        case Kind::Mr: ibv_dereg_mr(static_cast<ibv_mr*>(e->obj)); break;
        case Kind::Cq: ibv_destroy_cq(static_cast<ibv_cq*>(e->obj)); break;
        case Kind::Pd: ibv_dealloc_pd(static_cast<ibv_pd*>(e->obj)); break;
        case Kind::Context:
          ClosePoll(e->channelPoll);
          ClosePoll(e->asyncPoll);
          if (e->channel != nullptr) ibv_destroy_comp_channel(e->channel);
          ibv_close_device(static_cast<ibv_context*>(e->obj));
          break;
      }
      e->memory.Reset();
      e->onCqEvent.Reset();
      e->onAsyncEvent.Reset();
      Unregister(st, e);
    }
  }
  // Entries left (busy) are dropped without touching libibverbs.
  for (auto& [id, e] : st->entries) {
    e->channelPoll = nullptr;
    e->asyncPoll = nullptr;
  }
  st->entries.clear();
  delete st;
}

}  // namespace

Napi::Object InitVerbs(Napi::Env env) {
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
  o.Set("limits", limits);
  return o;
}

}  // namespace vrdma
