// Work-request decoding and completion encoding (the layouts of wr.h), post_send and post_recv, and the layout
// self-test functions test/verbs/layout.test.ts drives.
#include "wr.h"

#include <arpa/inet.h>

#include <cstring>
#include <mutex>

#include "registry.h"
#include "verbs_api.h"

namespace vrdma::verbs {

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

namespace {

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

// Appends the inline bytes of send work request `index` (the record at `*off`: one SGE {addr 0, length, lkey 0},
// then `length` bytes) as one host SGE pointing into `buf`, and moves `*off` past them. The bytes stay where they
// are: `buf` lives until ibv_post_send, which copies inline data before it returns. Returns false after throwing.
bool ParseInline(Napi::Env env, State* st, const char* verb, const uint8_t* buf, size_t len, uint32_t index,
                 uint32_t numSge, size_t* off) {
  auto refuse = [&](const std::string& why) {
    Throw(env, verb, EINVAL, "inline work request " + std::to_string(index) + " " + why);
    return false;
  };
  if (numSge != 1) return refuse("has num_sge " + std::to_string(numSge) + ", not 1");
  if (len - *off < SGE_BYTES) return refuse("runs past the end of the buffer");
  const uint8_t* q = buf + *off;
  uint32_t length = LoadU32(q + 8);
  if (LoadU64(q) != 0 || LoadU32(q + 12) != 0) return refuse("names memory (its addr and lkey must be 0)");
  if (length > MAX_INLINE_PER_WR)
    return refuse("has " + std::to_string(length) + " bytes, more than " + std::to_string(MAX_INLINE_PER_WR));
  *off += SGE_BYTES;
  if (len - *off < length) return refuse("has bytes past the end of the buffer");
  st->sgeStart[index] = st->sges.size();
  st->sges.push_back(ibv_sge{static_cast<uint64_t>(reinterpret_cast<uintptr_t>(buf + *off)), length, 0});
  *off += length;
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
    bool inlined = (wr.send_flags & IBV_SEND_INLINE) != 0;
    if (inlined ? !ParseInline(env, st, verb, buf, len, i, numSge, &off)
                : !ParseSges(env, st, verb, buf, len, i, numSge, &off))
      return false;
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
  if (e->mapped)
    return Throw(env, verb, EINVAL, "qp " + std::to_string(e->id) + " is mapped: its owner writes WQEs in place");
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

}  // namespace

Napi::Value PostSend(const Napi::CallbackInfo& info) { return PostList(info, true); }

uint32_t ProbeMaxInline(ibv_context* ctx) {
  ibv_pd* pd = ibv_alloc_pd(ctx);
  if (pd == nullptr) return 0;
  uint32_t found = 0;
  ibv_cq* cq = ibv_create_cq(ctx, 1, nullptr, nullptr, 0);
  if (cq != nullptr) {
    for (uint32_t want = INLINE_PROBE_MAX; want >= INLINE_PROBE_MIN && found == 0; want /= 2) {
      bool all = true;
      for (ibv_qp_type type : {IBV_QPT_RC, IBV_QPT_UD}) {
        ibv_qp_init_attr attr;
        memset(&attr, 0, sizeof attr);
        attr.send_cq = cq;
        attr.recv_cq = cq;
        attr.qp_type = type;
        attr.cap.max_send_wr = 1;
        attr.cap.max_recv_wr = 1;
        attr.cap.max_send_sge = 1;
        attr.cap.max_recv_sge = 1;
        attr.cap.max_inline_data = want;
        ibv_qp* qp = ibv_create_qp(pd, &attr);
        if (qp == nullptr) {
          all = false;
          break;
        }
        ibv_destroy_qp(qp);
      }
      if (all) found = want;
    }
    ibv_destroy_cq(cq);
  }
  ibv_dealloc_pd(pd);
  return found;
}
Napi::Value PostRecv(const Napi::CallbackInfo& info) { return PostList(info, false); }

// ---------------------------------------------------------------------------------------------- layout self-test

namespace {

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

}  // namespace

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
    if ((wr->send_flags & IBV_SEND_INLINE) != 0) {
      // The SGE points into the list buffer: report its bytes (what ibv_post_send would copy), no addresses.
      const ibv_sge& g = wr->sg_list[0];
      o.Set("inline", Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(g.addr)), g.length));
      o.Set("sgList", Napi::Array::New(env, 0));
    } else {
      o.Set("sgList", SgesToJs(env, wr->sg_list, wr->num_sge));
    }
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
}  // namespace vrdma::verbs
