// What each QP has outstanding, and the completions a QP's destroy took off a CQ on JS's behalf. Shared by the JS
// thread (post, poll) and the thread pool (a QP's destroy waits for its flush), so every access holds
// Completions::mu.
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
#pragma once
#include <infiniband/verbs.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <mutex>
#include <unordered_map>

namespace vrdma::verbs {

/** The largest flush deadline destroyQp accepts (FLUSH_LIMIT_MS of vmm-device/verbs/constants.ts is far below). */
constexpr uint64_t MAX_FLUSH_LIMIT_MS = 600000;

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

  void PushSend(uint64_t wrId, bool signaled);
  // Retires sends up to and including the first one named `wrId` (or, for a success not found by id, the first
  // signaled one).
  void RetireSends(uint64_t wrId, bool success);
  void RetireRecv(uint64_t wrId);
  bool Drained() const { return signaledOutstanding == 0 && recvs.empty(); }
};

struct Completions {
  std::mutex mu;
  std::unordered_map<uint32_t, QpWork> byQpNum;
  std::unordered_map<ibv_cq*, std::deque<ibv_wc>> taken;
};

// Retires the work `wc` (polled from `cq`) completes from its QP's outstanding work (caller holds mu).
void Account(Completions& c, ibv_cq* cq, const ibv_wc& wc);

// Polls `cq` empty into Completions::taken (for JS's next pollCq), accounting each (caller holds mu).
int TakeCompletions(Completions& c, ibv_cq* cq);

// Waits until the QP numbered `qpNum` has nothing outstanding (true), polling its CQs into Completions::taken, or
// until `limit` passes (false). Runs on the thread pool.
bool AwaitFlush(Completions& c, uint32_t qpNum, ibv_cq* sendCq, ibv_cq* recvCq, std::chrono::milliseconds limit);

}  // namespace vrdma::verbs
