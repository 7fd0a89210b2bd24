// Verbs that can sleep or pin memory (open, query, alloc/dealloc, create/modify/destroy, reg/dereg) run on the
// libuv thread pool and return Promises; while one runs, the objects it touches count a pending operation and
// cannot be destroyed. This is the one place that wraps napi's async worker: every such verb is a RunJob call
// (or a DestroyJob call) with its work, its result and the entries it holds.
//
// What runs on the pool touches only what the job captured (libibverbs objects, Out, the shared Completions):
// never a JS value, never the registry. The registry and JS values are touched in `finish` and `done`, which run
// on the JS thread.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "registry.h"

namespace vrdma::verbs {

// A job's result holder when the verb resolves to undefined.
struct NoOut {};

class Job : public Napi::AsyncWorker {
 public:
  Job(Napi::Env env, std::string verb)
      : Napi::AsyncWorker(env, "vrdma.verbs"), deferred_(Napi::Promise::Deferred::New(env)), verb_(std::move(verb)) {}

  // On the pool: 0 or an errno (and may set `detail`).
  std::function<int(std::string& detail)> run;
  // On the JS thread after run returned 0: the resolved value (a pending JS exception rejects instead).
  std::function<Napi::Value(Napi::Env)> done;
  // On the JS thread, always, before done or the rejection: releases holds, unregisters or restores handles.
  std::function<void(bool ok)> finish;

  Napi::Promise Start() {
    Napi::Promise p = deferred_.Promise();
    Queue();
    return p;
  }

 protected:
  void Execute() override { err_ = run ? run(detail_) : 0; }

  void OnOK() override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    if (finish) finish(err_ == 0);
    if (err_ != 0) {
      deferred_.Reject(VerbError(env, verb_, err_, detail_).Value());
      return;
    }
    Napi::Value v = done ? done(env) : env.Undefined();
    if (env.IsExceptionPending()) {
      deferred_.Reject(env.GetAndClearPendingException().Value());
      return;
    }
    deferred_.Resolve(v);
  }

  void OnError(const Napi::Error& e) override {
    if (finish) finish(false);
    deferred_.Reject(e.Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::string verb_;
  int err_ = 0;
  std::string detail_;
};

// Queues `verb` on the thread pool and returns its Promise.
//   run(out, detail) -> 0 or errno, on the pool; its results go in `out`, a value-initialised Out the job owns.
//   done(env, out) -> the resolved value, on the JS thread (omitted: undefined).
//   held: marked busy from now until the job finishes.
//   finish(ok): on the JS thread when it finishes, after the holds are released.
template <typename Out>
Napi::Value RunJob(Napi::Env env, const char* verb, std::vector<Entry*> held,
                   std::function<int(Out& out, std::string& detail)> run,
                   std::function<Napi::Value(Napi::Env, Out& out)> done = nullptr,
                   std::function<void(bool ok)> finish = nullptr) {
  auto out = std::make_shared<Out>();
  Job* job = new Job(env, verb);
  Hold(held);
  job->run = [out, run = std::move(run)](std::string& detail) { return run(*out, detail); };
  if (done) job->done = [out, done = std::move(done)](Napi::Env env) { return done(env, *out); };
  job->finish = [held = std::move(held), finish = std::move(finish)](bool ok) {
    Release(held);
    if (finish) finish(ok);
  };
  return job->Start();
}

// A verb without results.
inline Napi::Value RunJob(Napi::Env env, const char* verb, std::vector<Entry*> held, std::function<int()> run) {
  return RunJob<NoOut>(env, verb, std::move(held), [run = std::move(run)](NoOut&, std::string&) { return run(); });
}

// A destroy verb on the object of `kind` named by info[0]: refused (EBADF, EBUSY) as Lookup says; otherwise the
// handle is invalid from now on, `destroyFn(obj)` (0, an errno, or negative with errno set) runs on the pool, and
// the handle is unregistered on success or restored if libibverbs refused (the object still exists then).
template <typename Fn>
Napi::Value DestroyJob(const Napi::CallbackInfo& info, const char* verb, Kind kind, Fn destroyFn) {
  Napi::Env env = info.Env();
  State* st = StateOf(info);
  Entry* e = Lookup(st, env, verb, info[0], kind, true);
  if (e == nullptr) return env.Undefined();
  e->destroying = true;
  void* obj = e->obj;
  return RunJob<NoOut>(
      env, verb, {},
      [obj, destroyFn](NoOut&, std::string&) -> int {
        int rc = destroyFn(obj);
        return rc == 0 ? 0 : (rc > 0 ? rc : ErrnoOr(EIO));
      },
      nullptr,
      [st, e](bool ok) {
        if (ok) {
          e->memory.Reset();
          Unregister(st, e);
        } else {
          e->destroying = false;
        }
      });
}

}  // namespace vrdma::verbs
