// Mapped CQs and QPs (mapped.h): created and destroyed with raw uverbs commands, never mapped in this process.
#include "mapped.h"

#include <rdma/ib_user_verbs.h>
#include <rdma/rdma_user_rxe.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "jobs.h"
#include "verbs_api.h"
#include "wr.h"

namespace vrdma::verbs {

namespace {

/** Bytes of struct rxe_queue_buf, the header before the first slot (rdma_rxe's rxe_queue.h). */
constexpr uint64_t RXE_QUEUE_HEADER_BYTES = 384;
/** The smallest slot: rxe_queue_init pads an element to a cache line (x86: 64 bytes). */
constexpr uint32_t RXE_MIN_SLOT_BYTES = 64;
/** A CQ slot: struct rxe_cqe, a union of the kernel's struct ib_wc (more than 64 bytes on a 64-bit kernel) and
 *  struct ib_uverbs_wc (48), padded to a power of two. */
constexpr uint32_t RXE_CQ_SLOT_BYTES = 128;
/** Bytes of one SGE in an rxe WQE (struct rxe_sge / ib_sge). */
constexpr uint32_t RXE_SGE_BYTES = 16;
/** The largest depth or SGE count a mapped create accepts from JS (the kernel checks its own limits too). */
constexpr uint64_t MAX_MAPPED_DEPTH = 1u << 24;

constexpr uint64_t PAGE_BYTES = 4096;

uint64_t RoundUpPow2(uint64_t x) {
  uint64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

struct QueueGeometry {
  uint64_t offset = 0;
  uint64_t size = 0;
  uint32_t numSlots = 0;
  uint32_t slotSize = 0;
};

// The geometry of a queue of `depth` entries of `elemBytes` each whose create response said `mi`; false (with
// `detail`) when the response's size disagrees with rxe_queue_init's layout.
bool Geometry(const mminfo& mi, uint64_t depth, uint64_t elemBytes, const char* what, QueueGeometry* g,
              std::string& detail) {
  const uint64_t slot = RoundUpPow2(elemBytes < RXE_MIN_SLOT_BYTES ? RXE_MIN_SLOT_BYTES : elemBytes);
  const uint64_t slots = RoundUpPow2(depth + 1);
  const uint64_t bytes = (RXE_QUEUE_HEADER_BYTES + slots * slot + PAGE_BYTES - 1) & ~(PAGE_BYTES - 1);
  if (mi.size != bytes || (mi.offset & (PAGE_BYTES - 1)) != 0) {
    detail = std::string("the host's ") + what + " is " + std::to_string(mi.size) + " bytes at offset " +
             std::to_string(mi.offset) + ", the rxe layout gives " + std::to_string(bytes) + " (" +
             std::to_string(slots) + " slots of " + std::to_string(slot) + " bytes): unknown queue layout";
    return false;
  }
  g->offset = mi.offset;
  g->size = mi.size;
  g->numSlots = static_cast<uint32_t>(slots);
  g->slotSize = static_cast<uint32_t>(slot);
  return true;
}

Napi::Object GeometryToJs(Napi::Env env, const QueueGeometry& g) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("offset", Napi::BigInt::New(env, g.offset));
  o.Set("size", Napi::BigInt::New(env, g.size));
  o.Set("numSlots", g.numSlots);
  o.Set("slotSize", g.slotSize);
  return o;
}

}  // namespace

int WriteCommand(int cmdFd, uint32_t command, const void* req, size_t reqBytes, size_t respBytes) {
  uint8_t buf[sizeof(ib_uverbs_cmd_hdr) + 256];
  if (reqBytes > sizeof buf - sizeof(ib_uverbs_cmd_hdr) || (reqBytes & 3) != 0 || (respBytes & 3) != 0) return EINVAL;
  ib_uverbs_cmd_hdr hdr;
  hdr.command = command;
  hdr.in_words = static_cast<uint16_t>((sizeof hdr + reqBytes) / 4);
  hdr.out_words = static_cast<uint16_t>(respBytes / 4);
  memcpy(buf, &hdr, sizeof hdr);
  memcpy(buf + sizeof hdr, req, reqBytes);
  const ssize_t want = static_cast<ssize_t>(sizeof hdr + reqBytes);
  ssize_t n = write(cmdFd, buf, static_cast<size_t>(want));
  if (n == want) return 0;
  return n < 0 ? ErrnoOr(EIO) : EIO;
}

int DestroyMappedCqCommand(ibv_cq* cq) {
  ib_uverbs_destroy_cq_resp resp{};
  ib_uverbs_destroy_cq req{};
  req.response = reinterpret_cast<uintptr_t>(&resp);
  req.cq_handle = cq->handle;
  return WriteCommand(cq->context->cmd_fd, IB_USER_VERBS_CMD_DESTROY_CQ, &req, sizeof req, sizeof resp);
}

int DestroyMappedQpCommand(ibv_qp* qp) {
  ib_uverbs_destroy_qp_resp resp{};
  ib_uverbs_destroy_qp req{};
  req.response = reinterpret_cast<uintptr_t>(&resp);
  req.qp_handle = qp->handle;
  return WriteCommand(qp->context->cmd_fd, IB_USER_VERBS_CMD_DESTROY_QP, &req, sizeof req, sizeof resp);
}

void FreeMappedCq(ibv_cq* cq) {
  pthread_cond_destroy(&cq->cond);
  pthread_mutex_destroy(&cq->mutex);
  delete cq;
}

void FreeMappedQp(ibv_qp* qp) {
  pthread_cond_destroy(&qp->cond);
  pthread_mutex_destroy(&qp->mutex);
  delete qp;
}

void ReleaseMapped(Entry* e) {
  if (e->kind == Kind::Cq) {
    ibv_cq* cq = static_cast<ibv_cq*>(e->obj);
    DestroyMappedCqCommand(cq);
    FreeMappedCq(cq);
  } else if (e->kind == Kind::Qp) {
    ibv_qp* qp = static_cast<ibv_qp*>(e->obj);
    DestroyMappedQpCommand(qp);
    FreeMappedQp(qp);
  }
  e->obj = nullptr;
}

// ---------------------------------------------------------------------------------------------- CQ

namespace {

struct CreatedCq {
  ibv_cq* cq = nullptr;
  QueueGeometry g;
};

}  // namespace

// createMappedCq(ctx, cqe, compVector?) -> Promise<{cq, cqe, cmdFd, queue: {offset, size, numSlots, slotSize}}>
Napi::Value CreateMappedCq(const Napi::CallbackInfo& info) {
  VERB_ON("create_mapped_cq", Kind::Context, ctxE);
  uint64_t cqe = 0, vector = 0;
  if (!ReadUint(env, verb, "cqe", info[1], MAX_MAPPED_DEPTH, &cqe)) return env.Undefined();
  if (cqe == 0) return Throw(env, verb, EINVAL, "cqe is 0");
  if (!info[2].IsUndefined() && !ReadUint(env, verb, "compVector", info[2], 0x7fffffff, &vector))
    return env.Undefined();
  ibv_context* ctx = static_cast<ibv_context*>(ctxE->obj);
  ibv_comp_channel* channel = ctxE->channel;
  uint32_t id = ReserveId(st);
  return RunJob<CreatedCq>(
      env, verb, {ctxE},
      [ctx, channel, cqe, vector, id](CreatedCq& out, std::string& detail) -> int {
        // The struct comes first: its address is the user_handle the kernel gives back in events.
        ibv_cq* cq = new ibv_cq();
        cq->context = ctx;
        cq->channel = channel;
        cq->cq_context = reinterpret_cast<void*>(static_cast<uintptr_t>(id));
        pthread_mutex_init(&cq->mutex, nullptr);
        pthread_cond_init(&cq->cond, nullptr);
        struct {
          ib_uverbs_create_cq_resp core;
          rxe_create_cq_resp drv;
        } resp{};
        ib_uverbs_create_cq req{};
        req.response = reinterpret_cast<uintptr_t>(&resp);
        req.user_handle = reinterpret_cast<uintptr_t>(cq);
        req.cqe = static_cast<uint32_t>(cqe);
        req.comp_vector = static_cast<uint32_t>(vector);
        req.comp_channel = channel != nullptr ? channel->fd : -1;
        int rc = WriteCommand(ctx->cmd_fd, IB_USER_VERBS_CMD_CREATE_CQ, &req, sizeof req, sizeof resp);
        if (rc != 0) {
          FreeMappedCq(cq);
          return rc;
        }
        cq->handle = resp.core.cq_handle;
        if (!Geometry(resp.drv.mi, resp.core.cqe, RXE_CQ_SLOT_BYTES, "CQ", &out.g, detail)) {
          DestroyMappedCqCommand(cq);
          FreeMappedCq(cq);
          return EPROTO;
        }
        cq->cqe = static_cast<int>(out.g.numSlots - 1);
        out.cq = cq;
        return 0;
      },
      [st, ctxE, id, ctx](Napi::Env env, CreatedCq& out) -> Napi::Value {
        Entry* e = Register(st, Kind::Cq, out.cq, {ctxE->id}, id);
        e->mapped = true;
        Napi::Object o = Napi::Object::New(env);
        o.Set("cq", e->id);
        o.Set("cqe", out.cq->cqe);
        o.Set("cmdFd", ctx->cmd_fd);
        o.Set("queue", GeometryToJs(env, out.g));
        return o;
      });
}

// ---------------------------------------------------------------------------------------------- QP

namespace {

struct CreatedQp {
  ibv_qp* qp = nullptr;
  QueueGeometry sq, rq;
  ibv_qp_cap cap{};
};

}  // namespace

// createMappedQp(pd, init) -> Promise<{qp, qpNum, cap, cmdFd, sq, rq}>: an RC QP whose CQs are mapped CQs.
Napi::Value CreateMappedQp(const Napi::CallbackInfo& info) {
  VERB_ON("create_mapped_qp", Kind::Pd, pdE);
  if (!info[1].IsObject()) return Throw(env, verb, EINVAL, "init attributes must be an object");
  Napi::Object o = info[1].As<Napi::Object>();
  uint32_t type = 0, sendCqId = 0, recvCqId = 0;
  ibv_qp_cap cap{};
  if (!ReadRequired(env, verb, o, "qpType", &type) || !ReadRequired(env, verb, o, "sendCq", &sendCqId) ||
      !ReadRequired(env, verb, o, "recvCq", &recvCqId) ||
      !ReadRequired(env, verb, o, "maxSendWr", &cap.max_send_wr, MAX_MAPPED_DEPTH) ||
      !ReadRequired(env, verb, o, "maxRecvWr", &cap.max_recv_wr, MAX_MAPPED_DEPTH) ||
      !ReadRequired(env, verb, o, "maxSendSge", &cap.max_send_sge, MAX_SGE_PER_WR) ||
      !ReadRequired(env, verb, o, "maxRecvSge", &cap.max_recv_sge, MAX_SGE_PER_WR) ||
      !ReadField(env, verb, o, "maxInlineData", &cap.max_inline_data, nullptr, MAX_MAPPED_DEPTH))
    return env.Undefined();
  // Only RC: a rxe UD WQE names its own destination (spec 13.8).
  if (type != IBV_QPT_RC) return Throw(env, verb, EINVAL, "qpType " + std::to_string(type) + " is not RC (2)");
  const bool sigAll = ReadBool(o, "sqSigAll");
  Entry* sendCq = Lookup(st, env, verb, Napi::Number::New(env, sendCqId), Kind::Cq);
  if (sendCq == nullptr) return env.Undefined();
  Entry* recvCq = Lookup(st, env, verb, Napi::Number::New(env, recvCqId), Kind::Cq);
  if (recvCq == nullptr) return env.Undefined();
  if (!sendCq->mapped) return Throw(env, verb, EINVAL, "send CQ " + std::to_string(sendCqId) + " is not a mapped CQ");
  if (!recvCq->mapped) return Throw(env, verb, EINVAL, "recv CQ " + std::to_string(recvCqId) + " is not a mapped CQ");
  ibv_pd* pd = static_cast<ibv_pd*>(pdE->obj);
  ibv_cq* scq = static_cast<ibv_cq*>(sendCq->obj);
  ibv_cq* rcq = static_cast<ibv_cq*>(recvCq->obj);
  uint32_t id = ReserveId(st);
  return RunJob<CreatedQp>(
      env, verb, {pdE, sendCq, recvCq},
      [pd, scq, rcq, cap, sigAll, id](CreatedQp& out, std::string& detail) -> int {
        ibv_qp* qp = new ibv_qp();
        qp->context = pd->context;
        qp->qp_context = reinterpret_cast<void*>(static_cast<uintptr_t>(id));
        qp->pd = pd;
        qp->send_cq = scq;
        qp->recv_cq = rcq;
        qp->state = IBV_QPS_RESET;
        qp->qp_type = IBV_QPT_RC;
        pthread_mutex_init(&qp->mutex, nullptr);
        pthread_cond_init(&qp->cond, nullptr);
        struct {
          ib_uverbs_create_qp_resp core;
          rxe_create_qp_resp drv;
        } resp{};
        ib_uverbs_create_qp req{};
        req.response = reinterpret_cast<uintptr_t>(&resp);
        req.user_handle = reinterpret_cast<uintptr_t>(qp);
        req.pd_handle = pd->handle;
        req.send_cq_handle = scq->handle;
        req.recv_cq_handle = rcq->handle;
        req.max_send_wr = cap.max_send_wr;
        req.max_recv_wr = cap.max_recv_wr;
        req.max_send_sge = cap.max_send_sge;
        req.max_recv_sge = cap.max_recv_sge;
        req.max_inline_data = cap.max_inline_data;
        req.sq_sig_all = sigAll ? 1 : 0;
        req.qp_type = IB_UVERBS_QPT_RC;
        int rc = WriteCommand(pd->context->cmd_fd, IB_USER_VERBS_CMD_CREATE_QP, &req, sizeof req, sizeof resp);
        if (rc != 0) {
          FreeMappedQp(qp);
          return rc;
        }
        qp->handle = resp.core.qp_handle;
        qp->qp_num = resp.core.qpn;
        const uint64_t sqPayload = std::max<uint64_t>(uint64_t{resp.core.max_send_sge} * RXE_SGE_BYTES,
                                                      resp.core.max_inline_data);
        if (!Geometry(resp.drv.sq_mi, resp.core.max_send_wr, sizeof(rxe_send_wqe) + sqPayload, "SQ", &out.sq,
                      detail) ||
            !Geometry(resp.drv.rq_mi, resp.core.max_recv_wr,
                      sizeof(rxe_recv_wqe) + uint64_t{resp.core.max_recv_sge} * RXE_SGE_BYTES, "RQ", &out.rq,
                      detail)) {
          DestroyMappedQpCommand(qp);
          FreeMappedQp(qp);
          return EPROTO;
        }
        // The depths in effect: a queue of n slots holds n - 1 entries.
        out.cap.max_send_wr = out.sq.numSlots - 1;
        out.cap.max_recv_wr = out.rq.numSlots - 1;
        out.cap.max_send_sge = resp.core.max_send_sge;
        out.cap.max_recv_sge = resp.core.max_recv_sge;
        out.cap.max_inline_data = resp.core.max_inline_data;
        out.qp = qp;
        return 0;
      },
      [st, pdE, sendCq, recvCq, id](Napi::Env env, CreatedQp& out) -> Napi::Value {
        std::vector<uint32_t> parents{pdE->id, sendCq->id};
        if (recvCq != sendCq) parents.push_back(recvCq->id);
        Entry* e = Register(st, Kind::Qp, out.qp, parents, id);
        e->qpType = IBV_QPT_RC;
        e->mapped = true;
        Napi::Object r = Napi::Object::New(env);
        r.Set("qp", e->id);
        r.Set("qpNum", out.qp->qp_num);
        r.Set("cap", CapToJs(env, out.cap));
        r.Set("cmdFd", out.qp->context->cmd_fd);
        r.Set("sq", GeometryToJs(env, out.sq));
        r.Set("rq", GeometryToJs(env, out.rq));
        return r;
      });
}

// ---------------------------------------------------------------------------------------------- destroy

namespace {

// A destroy of the mapped object named by info[0] (checked as DestroyJob checks): `cmd` on the pool, then, on the
// JS thread where the event watchers run (so no event read is half handled), the struct is freed.
template <typename Cmd, typename Free>
Napi::Value DestroyMapped(const Napi::CallbackInfo& info, const char* verb, Kind kind, Cmd cmd, Free freeFn) {
  Napi::Env env = info.Env();
  State* st = StateOf(info);
  Entry* e = Lookup(st, env, verb, info[0], kind, true);
  if (e == nullptr) return env.Undefined();
  e->destroying = true;
  void* obj = e->obj;
  return RunJob<NoOut>(
      env, verb, {}, [obj, cmd](NoOut&, std::string&) -> int { return cmd(obj); }, nullptr,
      [st, e, obj, freeFn](bool ok) {
        if (ok) {
          freeFn(obj);
          Unregister(st, e);
        } else {
          e->destroying = false;
        }
      });
}

}  // namespace

bool IsMappedArg(const Napi::CallbackInfo& info) {
  if (!info[0].IsNumber()) return false;
  double d = info[0].As<Napi::Number>().DoubleValue();
  if (!(d >= 1 && d < 4294967296.0)) return false;
  auto it = StateOf(info)->entries.find(static_cast<uint32_t>(d));
  return it != StateOf(info)->entries.end() && it->second->mapped;
}

Napi::Value DestroyMappedCq(const Napi::CallbackInfo& info) {
  return DestroyMapped(
      info, "ibv_destroy_cq", Kind::Cq, [](void* o) { return DestroyMappedCqCommand(static_cast<ibv_cq*>(o)); },
      [](void* o) { FreeMappedCq(static_cast<ibv_cq*>(o)); });
}

// The QP goes to ERR first (unless in RESET), so the host flushes its outstanding WQEs into the mapped CQs for the
// guest to read; the device does not count or wait for them (spec 13.7). Its doorbell slot is detached before.
Napi::Value DestroyMappedQp(const Napi::CallbackInfo& info) {
  State* st = StateOf(info);
  Entry* e = Lookup(st, info.Env(), "ibv_destroy_qp", info[0], Kind::Qp, true);
  if (e == nullptr) return info.Env().Undefined();
  DetachQpFromEngine(st, e);
  return DestroyMapped(
      info, "ibv_destroy_qp", Kind::Qp,
      [](void* o) {
        ibv_qp* qp = static_cast<ibv_qp*>(o);
        ibv_qp_attr attr{};
        ibv_qp_init_attr init{};
        bool live = ibv_query_qp(qp, &attr, IBV_QP_STATE, &init) != 0 || attr.qp_state != IBV_QPS_RESET;
        if (live) {
          attr = ibv_qp_attr{};
          attr.qp_state = IBV_QPS_ERR;
          ibv_modify_qp(qp, &attr, IBV_QP_STATE);
        }
        return DestroyMappedQpCommand(qp);
      },
      [](void* o) { FreeMappedQp(static_cast<ibv_qp*>(o)); });
}

}  // namespace vrdma::verbs
