// Outstanding work per QP, the flush a QP's destroy waits for (completions.h), and the two synchronous CQ verbs:
// req_notify_cq and poll_cq (they do not enter the kernel on rxe beyond a doorbell write).
#include "completions.h"

#include <unistd.h>

#include <algorithm>

#include "registry.h"
#include "verbs_api.h"
#include "wr.h"

namespace vrdma::verbs {

namespace {

/** Completions read from libibverbs per ibv_poll_cq call (a stack array). */
constexpr int WC_BATCH = 64;
/** How often a destroy waiting for its QP's flush polls the QP's CQs. */
constexpr useconds_t FLUSH_POLL_INTERVAL_US = 200;

}  // namespace

void QpWork::PushSend(uint64_t wrId, bool signaled) {
  sends.push_back({wrId, signaled});
  if (signaled) signaledOutstanding++;
}

void QpWork::RetireSends(uint64_t wrId, bool success) {
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

void QpWork::RetireRecv(uint64_t wrId) {
  auto it = std::find(recvs.begin(), recvs.end(), wrId);
  if (it == recvs.end()) {
    if (!recvs.empty()) recvs.pop_front();
    return;
  }
  recvs.erase(recvs.begin(), it + 1);
}

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

bool AwaitFlush(Completions& c, uint32_t qpNum, ibv_cq* sendCq, ibv_cq* recvCq, std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
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

// pollCq(cq, out: Uint8Array, maxEntries) -> number of completions written to `out`.
Napi::Value PollCq(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* verb = "ibv_poll_cq";
  Entry* e = Lookup(StateOf(info), env, verb, info[0], Kind::Cq);
  if (e == nullptr) return env.Undefined();
  if (e->mapped) return Throw(env, verb, EINVAL, "cq " + std::to_string(e->id) + " is mapped: its owner polls it in place");
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

}  // namespace vrdma::verbs
