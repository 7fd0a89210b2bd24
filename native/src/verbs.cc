#include "verbs.h"

namespace vrdma {
Napi::Object InitVerbs(Napi::Env env) { return Napi::Object::New(env); }
}
