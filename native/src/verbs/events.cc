// The completion channel and async event watchers of each opened context (events.h).
#include "events.h"

#include <fcntl.h>

#include <cerrno>

namespace vrdma::verbs {

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

namespace {

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

// One watcher of `ctx` on `fd`, started; nullptr (with *err, a libuv error) when libuv refused. A handle that
// uv_poll_init did not accept is not in the loop: it is freed here, never started or closed (uv_poll_start or
// uv_close on it would act on uninitialised memory).
uv_poll_t* StartPoll(uv_loop_t* loop, int fd, Entry* ctx, uv_poll_cb cb, int* err) {
  auto* poll = new uv_poll_t;
  int rc = uv_poll_init(loop, poll, fd);
  if (rc != 0) {
    delete poll;
    *err = rc;
    return nullptr;
  }
  poll->data = ctx;
  rc = uv_poll_start(poll, UV_READABLE, cb);
  if (rc != 0) {
    ClosePoll(poll);
    *err = rc;
    return nullptr;
  }
  return poll;
}

}  // namespace

int StartWatchers(State* st, Entry* ctx) {
  int err = 0;
  ctx->channelPoll = StartPoll(st->loop, ctx->channel->fd, ctx, OnChannelReadable, &err);
  if (ctx->channelPoll == nullptr) return err;
  ctx->asyncPoll = StartPoll(st->loop, static_cast<ibv_context*>(ctx->obj)->async_fd, ctx, OnAsyncReadable, &err);
  if (ctx->asyncPoll == nullptr) {
    ClosePoll(ctx->channelPoll);
    return err;
  }
  // Async events alone do not keep the process alive; a CQ a caller waits on does (the channel watcher).
  uv_unref(reinterpret_cast<uv_handle_t*>(ctx->asyncPoll));
  return 0;
}

}  // namespace vrdma::verbs
