// The object registry: device contexts, PDs, CQs, QPs, MRs and AHs named in JS by small integer handles that are
// never reused. A handle becomes invalid the moment its object starts being destroyed; any later use throws
// `<verb>: EBADF (...)` naming the handle. Parents count their children (a PD its QPs, MRs and AHs; a context its
// PDs and CQs; a CQ the QPs using it), so destroying a parent that still has children fails with EBUSY before
// libibverbs is called, and so does destroying an object a job on the pool is still using (`pending`).
#pragma once
#include "common.h"

namespace vrdma::verbs {

// The live object of `kind` named by `v`, or nullptr after throwing a precise EBADF (or, `forDestroy`, EBUSY while
// it has children or pending jobs).
Entry* Lookup(State* st, Napi::Env env, const char* verb, Napi::Value v, Kind kind, bool forDestroy = false);

// A fresh handle (from nextId; never reused).
uint32_t ReserveId(State* st);

// `reservedId`: an id taken with ReserveId earlier (CQs and QPs carry theirs in their libibverbs context pointer).
Entry* Register(State* st, Kind kind, void* obj, std::vector<uint32_t> parents, uint32_t reservedId = 0);
void Unregister(State* st, Entry* e);

// Marks `entries` as used by a job until it finishes (they cannot be destroyed meanwhile).
void Hold(const std::vector<Entry*>& entries);
void Release(const std::vector<Entry*>& entries);

// Releases what is still alive when the environment ends, children before parents (QP, AH, MR, then CQ, PD,
// context), and frees the State. The environment cleanup hook.
void Cleanup(void* arg);

// The opening of a verb on one live object named by info[0]: `env`, `st`, `verb` and the object's entry
// (`entryVar`); returns undefined (with a precise EBADF thrown) when info[0] is not a live object of `kind`.
#define VERB_ON(verbName, kind, entryVar)                      \
  Napi::Env env = info.Env();                                   \
  State* st = StateOf(info);                                    \
  (void)st;                                                     \
  const char* verb = verbName;                                  \
  Entry* entryVar = Lookup(st, env, verb, info[0], kind);       \
  if (entryVar == nullptr) return env.Undefined()

}  // namespace vrdma::verbs
