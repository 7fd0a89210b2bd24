// The object registry (registry.h) and the release of what is left when the Node environment ends.
#include "registry.h"

#include <cerrno>

#include "events.h"
#include "mapped.h"

namespace vrdma::verbs {

const char* KindName(Kind k) {
  switch (k) {
    case Kind::Context: return "context";
    case Kind::Pd: return "pd";
    case Kind::Cq: return "cq";
    case Kind::Qp: return "qp";
    case Kind::Mr: return "mr";
    case Kind::Ah: return "ah";
    case Kind::Engine: return "doorbell engine";
  }
  return "?";
}

Entry* Lookup(State* st, Napi::Env env, const char* verb, Napi::Value v, Kind kind, bool forDestroy) {
  if (!v.IsNumber()) {
    Throw(env, verb, EBADF, std::string(KindName(kind)) + " handle must be a number");
    return nullptr;
  }
  double d = v.As<Napi::Number>().DoubleValue();
  uint32_t id = (d >= 0 && d < 4294967296.0) ? static_cast<uint32_t>(d) : 0;
  auto it = st->entries.find(id);
  if (id == 0 || static_cast<double>(id) != d || it == st->entries.end()) {
    Throw(env, verb, EBADF,
          std::string(KindName(kind)) + " handle " + Napi::Number::New(env, d).ToString().Utf8Value() +
              " does not exist or was already destroyed");
    return nullptr;
  }
  Entry* e = it->second.get();
  if (e->kind != kind) {
    Throw(env, verb, EBADF,
          std::string(KindName(kind)) + " handle " + std::to_string(id) + " is a " + KindName(e->kind) + " handle");
    return nullptr;
  }
  if (e->destroying) {
    Throw(env, verb, EBADF, std::string(KindName(kind)) + " handle " + std::to_string(id) + " is being destroyed");
    return nullptr;
  }
  if (forDestroy) {
    if (e->children > 0) {
      Throw(env, verb, EBUSY,
            std::string(KindName(kind)) + " " + std::to_string(id) + " still has " + std::to_string(e->children) +
                " dependent object(s); destroy them first");
      return nullptr;
    }
    if (e->pending > 0) {
      Throw(env, verb, EBUSY,
            std::string(KindName(kind)) + " " + std::to_string(id) + " has " + std::to_string(e->pending) +
                " operation(s) in progress");
      return nullptr;
    }
  }
  return e;
}

uint32_t ReserveId(State* st) { return st->nextId++; }

Entry* Register(State* st, Kind kind, void* obj, std::vector<uint32_t> parents, uint32_t reservedId) {
  auto e = std::make_unique<Entry>();
  e->kind = kind;
  e->id = reservedId != 0 ? reservedId : st->nextId++;
  e->state = st;
  e->obj = obj;
  e->parents = std::move(parents);
  for (uint32_t p : e->parents) st->entries.at(p)->children++;
  Entry* raw = e.get();
  st->entries.emplace(raw->id, std::move(e));
  return raw;
}

void Unregister(State* st, Entry* e) {
  for (uint32_t p : e->parents) {
    auto it = st->entries.find(p);
    if (it != st->entries.end()) it->second->children--;
  }
  st->entries.erase(e->id);
}

void Hold(const std::vector<Entry*>& entries) {
  for (Entry* e : entries) e->pending++;
}
void Release(const std::vector<Entry*>& entries) {
  for (Entry* e : entries) e->pending--;
}

// Releases what is still alive when the environment ends, children before parents. Objects with a job still
// running on the pool are left to the kernel (the process is ending; touching them would race the job).
void Cleanup(void* arg) {
  State* st = static_cast<State*>(arg);
  // The doorbell engines stop first: their threads write commands naming QP handles.
  const Kind order[] = {Kind::Engine, Kind::Qp, Kind::Ah, Kind::Mr, Kind::Cq, Kind::Pd, Kind::Context};
  for (Kind kind : order) {
    std::vector<Entry*> victims;
    for (auto& [id, e] : st->entries)
      if (e->kind == kind && !e->destroying && e->pending == 0) victims.push_back(e.get());
    for (Entry* e : victims) {
      if (kind == Kind::Engine) {  // its children are the QPs it serves: stopping detaches them
        StopEngine(st, e);
        Unregister(st, e);
        continue;
      }
      if (e->children > 0) continue;  // a child is busy: leave the parent to the kernel too
      if (e->mapped) {
        ReleaseMapped(e);
        Unregister(st, e);
        continue;
      }
      switch (kind) {
        case Kind::Engine: break;
        case Kind::Qp: ibv_destroy_qp(static_cast<ibv_qp*>(e->obj)); break;
        case Kind::Ah: ibv_destroy_ah(static_cast<ibv_ah*>(e->obj)); break;
        case Kind::Mr: ibv_dereg_mr(static_cast<ibv_mr*>(e->obj)); break;
        case Kind::Cq: ibv_destroy_cq(static_cast<ibv_cq*>(e->obj)); break;
        case Kind::Pd: ibv_dealloc_pd(static_cast<ibv_pd*>(e->obj)); break;
        case Kind::Context:
          ClosePoll(e->channelPoll);
          ClosePoll(e->asyncPoll);
          if (e->channel != nullptr) ibv_destroy_comp_channel(e->channel);
          ibv_close_device(static_cast<ibv_context*>(e->obj));
          break;
      }
      e->memory.Reset();
      e->onCqEvent.Reset();
      e->onAsyncEvent.Reset();
      Unregister(st, e);
    }
  }
  // Entries left (busy) are dropped without touching libibverbs.
  for (auto& [id, e] : st->entries) {
    e->channelPoll = nullptr;
    e->asyncPoll = nullptr;
  }
  st->entries.clear();
  delete st;
}

}  // namespace vrdma::verbs
