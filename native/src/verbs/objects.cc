// The object verbs under a context or PD, each a job on the thread pool (jobs.h): CQ, QP (create, modify, query,
// destroy with the flush of its outstanding work), MR and AH.
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "jobs.h"
#include "mapped.h"
#include "verbs_api.h"
#include "wr.h"

namespace vrdma::verbs {

// ---------------------------------------------------------------------------------------------- CQ

Napi::Value CreateCq(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_create_cq", Kind::Context, ctxE);
  uint64_t cqe = 0, vector = 0;
  if (!ReadUint(env, verb, "cqe", info[1], 0x7fffffff, &cqe)) return env.Undefined();
  if (!info[2].IsUndefined() && !ReadUint(env, verb, "compVector", info[2], 0x7fffffff, &vector))
    return env.Undefined();
  ibv_context* ctx = static_cast<ibv_context*>(ctxE->obj);
  ibv_comp_channel* channel = ctxE->channel;
  // The CQ's context pointer carries its handle so channel and async events name it; the id is reserved now.
  uint32_t id = ReserveId(st);
  return RunJob<ibv_cq*>(
      env, verb, {ctxE},
      [ctx, channel, cqe, vector, id](ibv_cq*& cq, std::string&) {
        errno = 0;
        cq = ibv_create_cq(ctx, static_cast<int>(cqe), reinterpret_cast<void*>(static_cast<uintptr_t>(id)), channel,
                           static_cast<int>(vector));
        return CreatedOr(cq, ENOMEM);
      },
      [st, ctxE, id](Napi::Env env, ibv_cq*& cq) -> Napi::Value {
        Entry* e = Register(st, Kind::Cq, cq, {ctxE->id}, id);
        Napi::Object o = Napi::Object::New(env);
        o.Set("cq", e->id);
        o.Set("cqe", cq->cqe);
        return o;
      });
}

Napi::Value DestroyCq(const Napi::CallbackInfo& info) {
  if (IsMappedArg(info)) return DestroyMappedCq(info);
  std::shared_ptr<Completions> completions = StateOf(info)->completions;
  return DestroyJob(info, "ibv_destroy_cq", Kind::Cq, [completions](void* o) {
    ibv_cq* cq = static_cast<ibv_cq*>(o);
    int rc = ibv_destroy_cq(cq);
    if (rc == 0) {
      std::lock_guard<std::mutex> lock(completions->mu);
      completions->taken.erase(cq);
    }
    return rc;
  });
}

// ---------------------------------------------------------------------------------------------- QP

namespace {

struct CreatedQp {
  ibv_qp* qp = nullptr;
};

}  // namespace

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
  // A mapped CQ is written by the host for the guest; a relayed QP's CQs are polled here (spec 13.3).
  if (sendCq->mapped || recvCq->mapped)
    return Throw(env, verb, EINVAL,
                 std::string(sendCq->mapped ? "send" : "recv") + " CQ " +
                     std::to_string(sendCq->mapped ? sendCqId : recvCqId) + " is a mapped CQ");
  attr->send_cq = static_cast<ibv_cq*>(sendCq->obj);
  attr->recv_cq = static_cast<ibv_cq*>(recvCq->obj);
  uint32_t id = ReserveId(st);
  attr->qp_context = reinterpret_cast<void*>(static_cast<uintptr_t>(id));
  ibv_pd* pd = static_cast<ibv_pd*>(pdE->obj);
  std::shared_ptr<Completions> completions = st->completions;
  return RunJob<CreatedQp>(
      env, verb, {pdE, sendCq, recvCq},
      [pd, attr, completions](CreatedQp& out, std::string&) -> int {
        errno = 0;
        out.qp = ibv_create_qp(pd, attr.get());
        if (out.qp == nullptr) return ErrnoOr(ENOMEM);
        {
          std::lock_guard<std::mutex> lock(completions->mu);
          QpWork& work = completions->byQpNum[out.qp->qp_num];
          work = QpWork{};
          work.signalAll = attr->sq_sig_all != 0;
          work.sendCq = attr->send_cq;
          work.recvCq = attr->recv_cq;
        }
        // Providers may round the queues up without writing the result back (rxe does): ask for the real ones.
        ibv_qp_attr actual;
        ibv_qp_init_attr init;
        if (ibv_query_qp(out.qp, &actual, IBV_QP_CAP, &init) == 0) attr->cap = actual.cap;
        return 0;
      },
      [st, attr, id, pdE, sendCq, recvCq](Napi::Env env, CreatedQp& out) -> Napi::Value {
        std::vector<uint32_t> parents{pdE->id, sendCq->id};
        if (recvCq != sendCq) parents.push_back(recvCq->id);
        Entry* e = Register(st, Kind::Qp, out.qp, parents, id);
        e->qpType = attr->qp_type;
        Napi::Object r = Napi::Object::New(env);
        r.Set("qp", e->id);
        r.Set("qpNum", out.qp->qp_num);
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
  return RunJob(env, verb, {e}, [qp, attr, mask]() -> int { return ibv_modify_qp(qp, attr.get(), mask); });
}

namespace {

struct QueriedQp {
  ibv_qp_attr attr;
  ibv_qp_init_attr init;
};

}  // namespace

Napi::Value QueryQp(const Napi::CallbackInfo& info) {
  VERB_ON("ibv_query_qp", Kind::Qp, e);
  ibv_qp* qp = static_cast<ibv_qp*>(e->obj);
  return RunJob<QueriedQp>(
      env, verb, {e},
      [qp](QueriedQp& out, std::string&) -> int {
        int mask = IBV_QP_STATE | IBV_QP_CUR_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS |
                   IBV_QP_QKEY | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                   IBV_QP_RQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER | IBV_QP_SQ_PSN |
                   IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_DEST_QPN | IBV_QP_CAP;
        return ibv_query_qp(qp, &out.attr, mask, &out.init);
      },
      [qp](Napi::Env env, QueriedQp& out) -> Napi::Value {
        const ibv_qp_attr& a = out.attr;
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
        o.Set("sqSigAll", out.init.sq_sig_all != 0);
        return o;
      });
}

// destroyQp(qp, flushLimitMs): the QP goes to ERR first, so its outstanding work requests complete with
// IBV_WC_WR_FLUSH_ERR on its CQs (where they stay pollable after the QP is gone). ibv_destroy_qp alone drops them
// silently on rxe: rxe flushes from a tasklet that the modify only schedules and that destroy cancels. No verb
// reports when a flush is done, so the destroy (on the thread pool) polls the QP's CQs, keeping what it takes for
// JS's next pollCq, until every receive and every signaled send the QP had outstanding has completed (see
// QpWork), at most `flushLimitMs` (FLUSH_LIMIT_MS of vmm-device/verbs/constants.ts, the backend's one flush
// deadline; a CQ that overflowed loses completions, and the QP is destroyed then anyway).
Napi::Value DestroyQp(const Napi::CallbackInfo& info) {
  uint64_t limitMs = 0;
  if (!ReadUint(info.Env(), "ibv_destroy_qp", "flushLimitMs", info[1], MAX_FLUSH_LIMIT_MS, &limitMs))
    return info.Env().Undefined();
  if (IsMappedArg(info)) return DestroyMappedQp(info);
  const auto limit = std::chrono::milliseconds(limitMs);
  std::shared_ptr<Completions> completions = StateOf(info)->completions;
  return DestroyJob(info, "ibv_destroy_qp", Kind::Qp, [completions, limit](void* o) {
    ibv_qp* qp = static_cast<ibv_qp*>(o);
    const uint32_t qpNum = qp->qp_num;
    ibv_qp_attr attr;
    ibv_qp_init_attr init;
    memset(&attr, 0, sizeof attr);
    bool needsFlush = ibv_query_qp(qp, &attr, IBV_QP_STATE, &init) != 0 || attr.qp_state != IBV_QPS_RESET;
    memset(&attr, 0, sizeof attr);
    attr.qp_state = IBV_QPS_ERR;
    // A QP in RESET holds no work; one that cannot go to ERR has nothing to flush.
    if (needsFlush && ibv_modify_qp(qp, &attr, IBV_QP_STATE) == 0)
      AwaitFlush(*completions, qpNum, qp->send_cq, qp->recv_cq, limit);
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
  auto memory = std::make_shared<Napi::Reference<Napi::ArrayBuffer>>(Napi::Persistent(ab));
  return RunJob<ibv_mr*>(
      env, verb, {pdE},
      [pd, addr, length, access, iova, withIova](ibv_mr*& mr, std::string&) {
        errno = 0;
        mr = withIova ? ibv_reg_mr_iova2(pd, addr, length, iova, static_cast<unsigned>(access))
                      : ibv_reg_mr(pd, addr, length, static_cast<int>(access));
        return CreatedOr(mr, ENOMEM);
      },
      [st, pdE, memory, withIova, iova, addr](Napi::Env env, ibv_mr*& mr) -> Napi::Value {
        Entry* e = Register(st, Kind::Mr, mr, {pdE->id});
        e->memory = std::move(*memory);
        Napi::Object o = Napi::Object::New(env);
        o.Set("mr", e->id);
        o.Set("lkey", mr->lkey);
        o.Set("rkey", mr->rkey);
        uint64_t a = withIova ? iova : reinterpret_cast<uintptr_t>(addr);
        o.Set("addr", Napi::BigInt::New(env, a));
        return o;
      });
}

Napi::Value DeregMr(const Napi::CallbackInfo& info) {
  return DestroyJob(info, "ibv_dereg_mr", Kind::Mr, [](void* o) { return ibv_dereg_mr(static_cast<ibv_mr*>(o)); });
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
  return RunJob<ibv_ah*>(
      env, verb, {pdE},
      [pd, attr](ibv_ah*& ah, std::string&) {
        errno = 0;
        ah = ibv_create_ah(pd, attr.get());
        return CreatedOr(ah, EINVAL);
      },
      [st, pdE](Napi::Env env, ibv_ah*& ah) -> Napi::Value {
        return Napi::Number::New(env, Register(st, Kind::Ah, ah, {pdE->id})->id);
      });
}

Napi::Value DestroyAh(const Napi::CallbackInfo& info) {
  return DestroyJob(info, "ibv_destroy_ah", Kind::Ah, [](void* o) { return ibv_destroy_ah(static_cast<ibv_ah*>(o)); });
}

}  // namespace vrdma::verbs
