#pragma once
#include <napi.h>

namespace vrdma {
// Builds the `verbs` object: libibverbs devices, PD, CQ, QP, MR, AH, post/poll, async events.
Napi::Object InitVerbs(Napi::Env env);
}
