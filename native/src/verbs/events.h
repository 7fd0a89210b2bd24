// Events: each opened context has one completion channel shared by its CQs and two uv_poll watchers on Node's loop
// (the channel fd and the context's async-event fd, both made non-blocking). Events are acknowledged here as soon
// as they are read, so destroying a CQ or QP never waits for an acknowledgement from JS. The callbacks run on the
// loop thread only; no thread of the addon touches a JS value.
#pragma once
#include "common.h"

namespace vrdma::verbs {

// Makes `fd` non-blocking; 0 or errno.
int SetNonBlocking(int fd);

// Starts the two watchers of context `ctx` (its channel and async fds): 0, or a libuv error (negative) after which
// no watcher is left in the loop.
int StartWatchers(State* st, Entry* ctx);

// Stops a watcher (no callback runs after this) and frees it once libuv is done with it; sets `poll` to nullptr.
void ClosePoll(uv_poll_t*& poll);

}  // namespace vrdma::verbs
