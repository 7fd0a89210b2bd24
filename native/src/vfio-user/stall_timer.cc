// See stall_timer.h.
#include "stall_timer.h"

#include <signal.h>
#include <unistd.h>

namespace vrdma {
namespace {
// The timer's real-time signal (Node and libuv use none of the real-time signals).
int StallSignal() { return SIGRTMIN + 7; }
void OnStallSignal(int) {}
}  // namespace

bool StallTimer::Create() {
  struct sigaction sa = {};
  sa.sa_handler = OnStallSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: the blocked call returns EINTR
  if (sigaction(StallSignal(), &sa, nullptr) != 0) return false;
  struct sigevent sev = {};
  sev.sigev_notify = SIGEV_THREAD_ID;
  sev.sigev_signo = StallSignal();
  sev._sigev_un._tid = gettid();  // sigev_notify_thread_id, which this glibc does not name
  created_ = timer_create(CLOCK_MONOTONIC, &sev, &timer_) == 0;
  return created_;
}

void StallTimer::Arm(bool on) {
  if (!created_) return;
  struct itimerspec its = {};
  if (on) its.it_value = {kTimeoutMs / 1000, (kTimeoutMs % 1000) * 1000000L};
  timer_settime(timer_, 0, &its, nullptr);
}

StallTimer::~StallTimer() {
  if (created_) timer_delete(timer_);
}
}  // namespace vrdma
