// The doorbell engine (spec 13.6): a thread of this process, the opener of the uverbs device (write() commands are
// refused to any other process), that executes the SQ doorbells of mapped QPs. It owns a memfd of doorbell pages
// (4096 bytes, 512 slots of 8 bytes each; the guest stores a QP's SQ producer index into its slot's first u32) and,
// for every attached slot whose value differs from the one it acted on last, issues POST_SEND with no work request
// on the QP's handle (rxe: runs the QP's requester, which reads the producer index from the SQ header itself). No
// JavaScript runs per doorbell.
//
// The guest writes slot values only. Each is read once per pass, compared, recorded; the QP handle comes from the
// attachment, never from guest memory, so a garbage value costs one idempotent system call on the guest's own QP.
// A pass is bounded by the attached slots (at most pages * 512), and attach, detach and ring take the engine's
// mutex, which the thread holds for a whole pass: when detach returns, the thread will not name that QP again
// (the kernel may give its handle to a later QP).
//
// Wake modes. 'notify': the thread sleeps in ppoll() on the wake eventfd (the VMM's kick of the doorbell queue) and
// its control eventfd, then drains the wake fd and scans. 'polled': the thread scans, spins (bounded by
// POLL_SPIN_NS after the last doorbell, yielding the CPU at every turn), then sleeps in ppoll() with a back-off
// doubling from POLL_MIN_SLEEP_NS up to POLL_MAX_SLEEP_NS, so an idle backend does not burn a core (the wake fd, when
// set, also ends a sleep early); its timer slack is ENGINE_TIMER_SLACK_NS so a sleep ends when asked.
//
// Which mode, by the figures (npm run bench:rdma's mapped rows in both modes in one run, and npm run bench:doorbell;
// rxe test host, 2 TCG vCPUs):
//   - quiet machine (host load ~1.5), the C guest loop, p50 polled / notify: WRITE 2 B 54 / 138 us (perftest 29.8),
//     SEND/RECV 53 / 153 us (15.1), READ 35 / 67 us (50.9); 64 KiB WRITE 33.6 / 30.0 MiB/s (40.3);
//   - overloaded machine (load 16-19, three test hosts on 2 cores), two runs: WRITE 14.2 / 13.8 ms and 7.3 ms /
//     150 us, SEND/RECV 11.9 / 0.95 ms and 5.8 / 1.9 ms, 64 KiB WRITE 5.7 / 4.6 and 7.5 / 5.7 MiB/s;
//   - idle: polled costs 11-22% of a vCPU, notify 1.4-5.8%.
// Polling needs the engine and the guest to run at the same time on different CPUs: when the host has fewer CPUs
// than runnable threads, a spinning engine waits for its turn (a scheduler slice), while a kicked one is woken
// where the kick came from. With a CPU for the engine POLLED wins (about 2.5x lower latency, no notify exit in the
// guest); where CPUs are shared NOTIFY does, and it costs less when idle. The command's default is POLLED
// (DEFAULT_HOST_QUEUE_MAPPING, vmm-device/cli/main.ts): the lower latency, and no extra virtqueue, which the
// project's QEMU command lines (num_vqs = 3) do not give; --host-queue-mapping notify with num_vqs = 3 + N.
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <rdma/ib_user_verbs.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>

#include "jobs.h"
#include "mapped.h"

namespace vrdma::verbs {

namespace {

constexpr uint32_t DOORBELL_PAGE_BYTES = 4096;
constexpr uint32_t DOORBELL_SLOT_BYTES = 8;
constexpr uint32_t SLOTS_PER_PAGE = DOORBELL_PAGE_BYTES / DOORBELL_SLOT_BYTES;
/** The most pages an engine takes: 64 pages serve 32,768 QPs (the scale target is 16,384 per VM). */
constexpr uint32_t MAX_DOORBELL_PAGES = 64;
/**
 * Polled mode: how long the thread keeps spinning after the last doorbell it executed. Longer than a ping-pong's
 * round trip under TCG (about 2 x 14 us one-way on rxe), so a QP with recent work never waits for a sleep to end.
 */
constexpr int64_t POLL_SPIN_NS = 200'000;
/** Polled mode: the first and the longest sleep once the spin is over. */
constexpr int64_t POLL_MIN_SLEEP_NS = 10'000;
constexpr int64_t POLL_MAX_SLEEP_NS = 1'000'000;

struct Slot {
  bool attached = false;
  uint32_t qpHandle = 0;
  uint32_t qpEntry = 0;
  uint32_t last = 0;
  std::atomic<uint64_t> executed{0};
  std::atomic<uint64_t> refused{0};
};

/**
 * One turn of the polled spin: sched_yield() rather than a PAUSE. On a host with fewer CPUs than runnable threads
 * (the guest's loop, the engines of other VMs, rxe's work in their system calls) a spinning engine must leave the
 * CPU to them, or the doorbell it waits for is stored a scheduler slice (milliseconds) later; on an idle CPU the
 * call returns at once.
 */
inline void SpinTurn() { sched_yield(); }

/** Timer slack of the engine's thread (ns): its back-off sleeps end when asked, not up to 50 us (the default) later. */
constexpr unsigned long ENGINE_TIMER_SLACK_NS = 1;

uint64_t NowNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

}  // namespace

class Engine {
 public:
  Engine(int cmdFd, uint32_t pages, bool notify) : cmdFd_(cmdFd), pages_(pages), notify_(notify), slots_(pages * SLOTS_PER_PAGE) {}

  int Start(std::string& detail) {
    const size_t bytes = static_cast<size_t>(pages_) * DOORBELL_PAGE_BYTES;
    memfd_ = memfd_create("vrdma-doorbells", MFD_CLOEXEC);
    if (memfd_ < 0) return detail = "memfd_create", errno;
    if (ftruncate(memfd_, static_cast<off_t>(bytes)) != 0) return detail = "ftruncate", errno;
    void* p = mmap(nullptr, bytes, PROT_READ, MAP_SHARED, memfd_, 0);
    if (p == MAP_FAILED) return detail = "mmap", errno;
    words_ = static_cast<const uint32_t*>(p);
    ctlFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (ctlFd_ < 0) return detail = "eventfd", errno;
    thread_ = std::thread([this] { Run(); });
    pthread_setname_np(thread_.native_handle(), "vrdma-doorbell");  // seen in top -H, perf, /proc/<pid>/task
    return 0;
  }

  ~Engine() {
    Stop();
    if (words_ != nullptr) munmap(const_cast<uint32_t*>(words_), static_cast<size_t>(pages_) * DOORBELL_PAGE_BYTES);
    if (memfd_ >= 0) close(memfd_);
    if (ctlFd_ >= 0) close(ctlFd_);
    if (wakeFd_ >= 0) close(wakeFd_);
    for (int fd : retired_) close(fd);
  }

  void Stop() {
    if (!thread_.joinable()) return;
    stop_.store(true);
    Kick();
    thread_.join();
  }

  int memfd() const { return memfd_; }
  uint32_t numSlots() const { return static_cast<uint32_t>(slots_.size()); }
  Slot& slot(uint32_t i) { return slots_[i]; }

  // The JS thread's entry: waits for the thread's pass to end (the thread yields to a waiting caller).
  std::unique_lock<std::mutex> Lock() {
    waiters_.fetch_add(1);
    std::unique_lock<std::mutex> lock(mu_);
    waiters_.fetch_sub(1);
    return lock;
  }

  // Caller holds the lock. 0, or the errno of the slot's reset (the slot is then left detached).
  int Attach(uint32_t i, uint32_t qpHandle, uint32_t qpEntry) {
    // A slot is reused by later QPs: what the last one stored (its final SQ producer index) could equal the new
    // QP's first store and hide that doorbell. The slot starts at 0, as the new queue's producer index does.
    // The engine maps the pages read-only, so the reset goes through the memfd (the same page-cache page).
    const uint32_t zero = 0;
    const off_t at = static_cast<off_t>(i) * DOORBELL_SLOT_BYTES;
    errno = 0;
    if (pwrite(memfd_, &zero, sizeof zero, at) != static_cast<ssize_t>(sizeof zero)) return errno != 0 ? errno : EIO;
    Slot& s = slots_[i];
    s.attached = true;
    s.qpHandle = qpHandle;
    s.qpEntry = qpEntry;
    s.last = 0;
    s.executed.store(0);
    s.refused.store(0);
    attached_.push_back(i);
    return 0;
  }

  void Detach(uint32_t i) {
    slots_[i].attached = false;
    for (size_t k = 0; k < attached_.size(); k++)
      if (attached_[k] == i) {
        attached_[k] = attached_.back();
        attached_.pop_back();
        break;
      }
  }

  // Executes slot i's doorbell now and records its value (caller holds the lock).
  void Execute(uint32_t i) {
    Slot& s = slots_[i];
    s.last = Value(i);
    ib_uverbs_post_send_resp resp{};
    ib_uverbs_post_send req{};
    req.response = reinterpret_cast<uintptr_t>(&resp);
    req.qp_handle = s.qpHandle;
    req.wr_count = 0;
    req.sge_count = 0;
    req.wqe_size = sizeof(ib_uverbs_send_wr);
    if (WriteCommand(cmdFd_, IB_USER_VERBS_CMD_POST_SEND, &req, sizeof req, sizeof resp) == 0)
      s.executed.fetch_add(1, std::memory_order_relaxed);
    else
      s.refused.fetch_add(1, std::memory_order_relaxed);
  }

  // Caller holds the lock. The old fd is closed by the thread after its ppoll returns (never under a sleeping poll).
  void SetWakeFd(int fd) {
    if (wakeFd_ >= 0) retired_.push_back(wakeFd_);
    wakeFd_ = fd;
    Kick();
  }

 private:
  uint32_t Value(uint32_t i) const { return __atomic_load_n(&words_[i * (DOORBELL_SLOT_BYTES / 4)], __ATOMIC_ACQUIRE); }

  void Kick() {
    uint64_t one = 1;
    ssize_t n = write(ctlFd_, &one, sizeof one);
    (void)n;  // a full counter (never here) still wakes the thread
  }

  static void Drain(int fd) {
    uint64_t v;
    ssize_t n = read(fd, &v, sizeof v);
    (void)n;  // EAGAIN: nothing to drain
  }

  // One pass over the attached slots; whether a doorbell was executed.
  bool Pass() {
    bool acted = false;
    for (uint32_t i : attached_)
      if (Value(i) != slots_[i].last) {
        Execute(i);
        acted = true;
      }
    return acted;
  }

  void Run() {
    prctl(PR_SET_TIMERSLACK, ENGINE_TIMER_SLACK_NS, 0, 0, 0);  // best effort: a refusal only makes sleeps coarser
    uint64_t lastActivity = NowNs();
    int64_t sleepNs = 0;
    // Notify mode scans only when kicked (or after acting, until nothing changes): a wake of the control eventfd
    // (attach, detach, a new wake fd) only makes the thread re-read its state, so a store without a kick stays
    // unseen, as spec 13.6 says.
    bool scan = true;
    while (!stop_.load(std::memory_order_relaxed)) {
      int wakeFd;
      bool acted;
      {
        if (waiters_.load(std::memory_order_relaxed) > 0) std::this_thread::yield();
        std::lock_guard<std::mutex> lock(mu_);
        for (int fd : retired_) close(fd);
        retired_.clear();
        acted = scan && Pass();
        wakeFd = wakeFd_;
      }
      if (acted) {
        lastActivity = NowNs();
        sleepNs = 0;
        continue;
      }
      timespec ts{};
      const timespec* timeout = nullptr;  // notify: until woken
      if (!notify_) {
        if (static_cast<int64_t>(NowNs() - lastActivity) < POLL_SPIN_NS) {
          SpinTurn();
          continue;
        }
        sleepNs = sleepNs == 0 ? POLL_MIN_SLEEP_NS : std::min(sleepNs * 2, POLL_MAX_SLEEP_NS);
        ts.tv_sec = 0;
        ts.tv_nsec = sleepNs;
        timeout = &ts;
      }
      pollfd fds[2] = {{ctlFd_, POLLIN, 0}, {wakeFd, POLLIN, 0}};
      int n = ppoll(fds, wakeFd >= 0 ? 2 : 1, timeout, nullptr);
      bool kicked = false;
      if (n > 0) {
        if (fds[0].revents & POLLIN) Drain(ctlFd_);
        // Drained before the scan: a kick that follows a store is never lost.
        if (wakeFd >= 0 && (fds[1].revents & POLLIN)) {
          std::lock_guard<std::mutex> lock(mu_);
          // A kick of a wake fd replaced meanwhile is not a doorbell of this engine any more.
          if (wakeFd == wakeFd_) {
            Drain(wakeFd);
            kicked = true;
          }
        }
      }
      scan = !notify_ || kicked;
    }
  }

  int cmdFd_;
  uint32_t pages_;
  bool notify_;
  std::vector<Slot> slots_;
  std::vector<uint32_t> attached_;
  std::mutex mu_;
  std::atomic<int> waiters_{0};
  std::atomic<bool> stop_{false};
  const uint32_t* words_ = nullptr;
  int memfd_ = -1;
  int ctlFd_ = -1;
  int wakeFd_ = -1;
  std::vector<int> retired_;
  std::thread thread_;
};

namespace {

Engine* EngineOf(Entry* e) { return static_cast<Engine*>(e->obj); }

// The engine named by info[0] and a slot index read from info[1] (< its slot count); nullptr after a throw.
Engine* EngineAndSlot(const Napi::CallbackInfo& info, const char* verb, Entry** entry, uint32_t* slot) {
  Napi::Env env = info.Env();
  Entry* e = Lookup(StateOf(info), env, verb, info[0], Kind::Engine);
  if (e == nullptr) return nullptr;
  Engine* engine = EngineOf(e);
  uint64_t s = 0;
  if (!ReadUint(env, verb, "slot", info[1], engine->numSlots() - 1, &s)) return nullptr;
  *entry = e;
  *slot = static_cast<uint32_t>(s);
  return engine;
}

}  // namespace

// createDoorbellEngine(ctx, pages, notify) -> {engine, fd, size}
Napi::Value CreateDoorbellEngine(const Napi::CallbackInfo& info) {
  VERB_ON("doorbell_engine", Kind::Context, ctxE);
  uint64_t pages = 0;
  if (!ReadUint(env, verb, "pages", info[1], MAX_DOORBELL_PAGES, &pages)) return env.Undefined();
  if (pages == 0) return Throw(env, verb, EINVAL, "pages is 0");
  const bool notify = info[2].IsBoolean() && info[2].As<Napi::Boolean>().Value();
  auto* engine = new Engine(static_cast<ibv_context*>(ctxE->obj)->cmd_fd, static_cast<uint32_t>(pages), notify);
  std::string detail;
  int rc = engine->Start(detail);
  if (rc != 0) {
    delete engine;
    return Throw(env, verb, rc, detail + " failed");
  }
  Entry* e = Register(st, Kind::Engine, engine, {ctxE->id});
  Napi::Object o = Napi::Object::New(env);
  o.Set("engine", e->id);
  o.Set("fd", engine->memfd());
  o.Set("size", Napi::BigInt::New(env, pages * DOORBELL_PAGE_BYTES));
  return o;
}

// attach(engine, slot, qp)
Napi::Value DoorbellAttach(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* verb = "doorbell_attach";
  Entry* e = nullptr;
  uint32_t slot = 0;
  Engine* engine = EngineAndSlot(info, verb, &e, &slot);
  if (engine == nullptr) return env.Undefined();
  Entry* qp = Lookup(StateOf(info), env, verb, info[2], Kind::Qp);
  if (qp == nullptr) return env.Undefined();
  if (!qp->mapped) return Throw(env, verb, EINVAL, "qp " + std::to_string(qp->id) + " is not a mapped QP");
  if (qp->engineId != 0)
    return Throw(env, verb, EBUSY, "qp " + std::to_string(qp->id) + " is already attached to slot " +
                                       std::to_string(qp->engineSlot));
  if (static_cast<ibv_qp*>(qp->obj)->context->cmd_fd != static_cast<ibv_context*>(
                                                             StateOf(info)->entries.at(e->parents[0])->obj)->cmd_fd)
    return Throw(env, verb, EINVAL, "qp " + std::to_string(qp->id) + " belongs to another device");
  auto lock = engine->Lock();
  if (engine->slot(slot).attached)
    return Throw(env, verb, EBUSY, "slot " + std::to_string(slot) + " is attached to another QP");
  if (int rc = engine->Attach(slot, static_cast<ibv_qp*>(qp->obj)->handle, qp->id); rc != 0)
    return Throw(env, verb, rc, "resetting slot " + std::to_string(slot) + " failed");
  qp->engineId = e->id;
  qp->engineSlot = slot;
  e->children++;  // the engine cannot close while serving a QP without detaching it (done by close itself)
  return env.Undefined();
}

namespace {

void DetachSlot(State* st, Entry* e, uint32_t slot) {
  Engine* engine = EngineOf(e);
  auto lock = engine->Lock();
  Slot& s = engine->slot(slot);
  if (!s.attached) return;
  engine->Detach(slot);
  auto it = st->entries.find(s.qpEntry);
  if (it != st->entries.end() && it->second->engineId == e->id) it->second->engineId = 0;
  e->children--;
}

}  // namespace

Napi::Value DoorbellDetach(const Napi::CallbackInfo& info) {
  Entry* e = nullptr;
  uint32_t slot = 0;
  if (EngineAndSlot(info, "doorbell_detach", &e, &slot) == nullptr) return info.Env().Undefined();
  DetachSlot(StateOf(info), e, slot);
  return info.Env().Undefined();
}

void DetachQpFromEngine(State* st, Entry* qp) {
  if (qp->engineId == 0) return;
  auto it = st->entries.find(qp->engineId);
  if (it != st->entries.end() && it->second->obj != nullptr) DetachSlot(st, it->second.get(), qp->engineSlot);
  qp->engineId = 0;
}

// ring(engine, slot): executes the slot's doorbell now (EINVAL when no QP is attached).
Napi::Value DoorbellRing(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Entry* e = nullptr;
  uint32_t slot = 0;
  Engine* engine = EngineAndSlot(info, "doorbell_ring", &e, &slot);
  if (engine == nullptr) return env.Undefined();
  auto lock = engine->Lock();
  if (!engine->slot(slot).attached)
    return Throw(env, "doorbell_ring", EINVAL, "slot " + std::to_string(slot) + " has no QP attached");
  engine->Execute(slot);
  return env.Undefined();
}

// setWakeFd(engine, fd | -1): the engine keeps a dup of fd.
Napi::Value DoorbellSetWakeFd(const Napi::CallbackInfo& info) {
  VERB_ON("doorbell_set_wake_fd", Kind::Engine, e);
  int fd = -1;
  if (!info[1].IsUndefined() && !(info[1].IsNumber() && info[1].As<Napi::Number>().Int32Value() == -1)) {
    uint64_t raw = 0;
    if (!ReadUint(env, verb, "fd", info[1], 0x7fffffff, &raw)) return env.Undefined();
    fd = fcntl(static_cast<int>(raw), F_DUPFD_CLOEXEC, 0);
    if (fd < 0) return Throw(env, verb, errno, "cannot duplicate fd " + std::to_string(raw));
  }
  Engine* engine = EngineOf(e);
  auto lock = engine->Lock();
  engine->SetWakeFd(fd);
  return env.Undefined();
}

// counters(engine, slot) -> {executed: bigint, refused: bigint} (of the slot's current or last attachment)
Napi::Value DoorbellCounters(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Entry* e = nullptr;
  uint32_t slot = 0;
  Engine* engine = EngineAndSlot(info, "doorbell_counters", &e, &slot);
  if (engine == nullptr) return env.Undefined();
  Slot& s = engine->slot(slot);
  Napi::Object o = Napi::Object::New(env);
  o.Set("executed", Napi::BigInt::New(env, s.executed.load(std::memory_order_relaxed)));
  o.Set("refused", Napi::BigInt::New(env, s.refused.load(std::memory_order_relaxed)));
  return o;
}

void StopEngine(State* st, Entry* e) {
  Engine* engine = EngineOf(e);
  if (engine == nullptr) return;
  engine->Stop();
  for (uint32_t i = 0; i < engine->numSlots(); i++)
    if (engine->slot(i).attached) DetachSlot(st, e, i);
  delete engine;
  e->obj = nullptr;
}

// close(engine): stops the thread (every slot detached), frees the pages and the fds.
Napi::Value CloseDoorbellEngine(const Napi::CallbackInfo& info) {
  VERB_ON("doorbell_close", Kind::Engine, e);
  StopEngine(st, e);
  Unregister(st, e);
  return env.Undefined();
}

}  // namespace vrdma::verbs
