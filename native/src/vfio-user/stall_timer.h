#pragma once
#include <time.h>

namespace vrdma {
// libvfio-user reads a client's VERSION message (inside attach()) and each message body with blocking receives on
// the JS thread, and sends replies blocking: a client that connects and says nothing, or stops reading, would stall
// the whole event loop. A StallTimer is a per-thread timer armed around those calls: when it fires, its signal
// (whose handler does nothing and is installed without SA_RESTART) makes the blocked recvmsg/sendmsg return EINTR,
// and the caller drops the client. (AF_UNIX sockets from accept() inherit no SO_RCVTIMEO from the listener.)
class StallTimer {
 public:
  // Longest one attach()/run() may block on a client.
  static constexpr int kTimeoutMs = 1000;
  // Creates the timer for the calling thread; false (errno set) on failure.
  bool Create();
  // Arms (on) or disarms the timer.
  void Arm(bool on);
  ~StallTimer();

 private:
  timer_t timer_{};
  bool created_ = false;
};
}  // namespace vrdma
